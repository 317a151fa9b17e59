"""Byte-level BPE tokenizer (CS336 assignment 1): ``train_bpe`` and ``Tokenizer``.

``train_bpe`` is imported eagerly: the function shares its name with its module, and a lazy
import would leave ``cs336.tokenizer.train_bpe`` naming the module after the first use.
``Tokenizer`` is imported on first access (PEP 562 ``__getattr__``), so training a tokenizer in a
fresh process does not load the encoder (``tokenizer``, ``encode_numba``, ``gpt2_files``).
"""

from .train_bpe import train_bpe

__all__ = ["Tokenizer", "train_bpe"]


def __getattr__(name: str):
    if name == "Tokenizer":
        from .tokenizer import Tokenizer

        return Tokenizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
