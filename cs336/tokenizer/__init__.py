"""Byte-level BPE tokenizer (CS336 assignment 1): ``train_bpe`` and ``Tokenizer``.

``train_bpe`` is imported on first use, so ``from cs336.tokenizer import Tokenizer`` does not
load the trainer.
"""

from .tokenizer import Tokenizer

__all__ = ["Tokenizer", "train_bpe"]


def __getattr__(name: str):
    if name == "train_bpe":
        from .train_bpe import train_bpe

        return train_bpe
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
