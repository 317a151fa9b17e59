"""Byte-level BPE tokenizer (CS336 assignment 1): ``train_bpe`` and ``Tokenizer``.

``train_bpe`` is imported eagerly: the function shares its name with its module, and a lazy
import would leave ``cs336.tokenizer.train_bpe`` naming the module after the first use.
"""

from .tokenizer import Tokenizer
from .train_bpe import train_bpe

__all__ = ["Tokenizer", "train_bpe"]
