"""Data preparation for a training run: corpus, tokenizer, token files, and their checks.

``prepare_data(cfg, run_dir, info, say, source)`` returns ``(train_tokens, valid_tokens,
tokenizer)``: the text (embedded corpus, ``--train-text``, or ``--dataset`` downloads), a BPE
tokenizer trained on its first ``data.tokenizer_sample_mb`` MB (or ``data.tokenizer_dir``), and
``DIR/data/{train,valid}.bin`` encoded with it. Rank 0 does the work; the other ranks wait at a
barrier, receive the tokenizer's hash and open the same token files (only rank 0 gets the
tokenizer, for the final sample). The tokenizer is parsed and hashed once per run:
``source_tokenizer(cfg)`` reads a ``data.tokenizer_dir`` before any work (on every rank, so one
too large for the model stops them all) and ``prepare_data`` reuses it. Every cache is keyed by its inputs
(``source.json``, ``corpus.json``, the token files' sidecars) and rebuilt when stale; every file
is written under a temporary name first (``cs336.fileio``). Follows the handout's pipeline
(train BPE, encode to uint16, memmap); the keys and checks are ours.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from cs336 import corpus
from cs336 import distributed as dist_utils
from cs336.config import ConfigError, TrainConfig
from cs336.data import TokenFileError, load_tokens, sidecar_path
from cs336.datasets import fetch
from cs336.fileio import atomic_write_bytes, atomic_write_text
from cs336.preflight import check_text_file, check_tokenizer_fits
from cs336.run_dir import RunDir
from cs336.tokenizer import Tokenizer
from cs336.tokenizer.encode_file import encode_file
from cs336.tokenizer.gpt2_files import META_FILE, load_meta, load_vocab_merges, save_vocab_merges, tokenizer_hash
from cs336.tokenizer.train_bpe import train_bpe

PARALLEL_ENCODE_BYTES = 64_000_000
"""Texts larger than this are encoded by one worker process per CPU (up to 8); smaller ones
finish in seconds in this process, where starting workers would cost more than it saves."""


TOKENIZER_KEY = "source.json"
CORPUS_KEY = "corpus.json"


def file_key(path: str | os.PathLike) -> dict:
    """What identifies an input file's contents cheaply: resolved path, size, mtime (ns)."""
    p = Path(path)
    st = p.stat()
    return {"path": str(p.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_key(path: Path) -> dict | None:
    try:
        key = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return key if isinstance(key, dict) else None


def _write_key(path: Path, key: dict) -> None:
    atomic_write_text(path, json.dumps(key, indent=1) + "\n")


def _differences(old: dict | None, new: dict) -> str:
    if old is None:
        return "no record of its inputs"
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return "other " + ", ".join(changed)


def token_file_is_current(path: Path, text: Path, tok_hash: str) -> str | None:
    """None when ``path`` was encoded from ``text`` as it is now with the tokenizer of hash
    ``tok_hash``; else the reason it is stale."""
    if not path.is_file():
        return "missing"
    meta = _read_key(sidecar_path(path))
    if meta is None:
        return "no readable sidecar"
    key = file_key(text)
    recorded = {"path": meta.get("input"), "bytes": meta.get("input_bytes"), "mtime_ns": meta.get("input_mtime_ns")}
    if recorded != key:
        return f"made from {recorded['path']} ({recorded['bytes']} bytes), not {key['path']} as it is now"
    if meta.get("tokenizer_hash") != tok_hash:
        return "made with another tokenizer"
    try:
        load_tokens(path)
    except TokenFileError as exc:
        return str(exc)
    return None


def _text_paths(cfg: TrainConfig, rd: RunDir, say) -> tuple[Path, Path]:
    source = cfg.data.source
    if source == "text":
        return (check_text_file("--train-text", cfg.data.train_text),
                check_text_file("--valid-text", cfg.data.valid_text))
    if source == "embedded":
        train, valid = rd.data / "train.txt", rd.data / "valid.txt"
        separator = cfg.data.special_tokens[0]  # the document separator of the run
        key: dict[str, Any] = {"corpus_mb": cfg.data.corpus_mb, "corpus_seed": cfg.data.corpus_seed}
        if separator != corpus.EOT:  # keys written before the separator followed the config stay valid
            key["separator"] = separator
        if not (train.is_file() and valid.is_file() and _read_key(rd.data / CORPUS_KEY) == key):
            (rd.data / CORPUS_KEY).unlink(missing_ok=True)
            say(f"writing the embedded story corpus ({cfg.data.corpus_mb} MB) to {rd.data}")
            corpus.write_corpus(rd.data, cfg.data.corpus_mb, cfg.data.corpus_seed, separator=separator)
            _write_key(rd.data / CORPUS_KEY, key)
        return train, valid
    return fetch(source, cfg.data.data_dir, base_url=cfg.data.dataset_base_url)


def _tokenizer_sample(train_text: Path, rd: RunDir, megabytes: float | None, separator: str) -> Path:
    """The training text itself, or its first ``megabytes`` MB (10**6 bytes) cut after the last
    document separator in them (without one, before a character the limit would split). The
    bytes are copied as they are: line ends (``\r\n``) stay what the encoder will see."""
    limit = None if megabytes is None else int(megabytes * 1_000_000)
    if limit is None or train_text.stat().st_size <= limit:
        return train_text
    with open(train_text, "rb") as fh:
        head = fh.read(limit)
    sep = separator.encode("utf-8")
    cut = head.rfind(sep)
    sample = head[: cut + len(sep)] if cut > 0 else _whole_characters(head)
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as exc:  # the whole text would fail to encode later, after training
        raise ConfigError(f"{train_text} is not UTF-8 (byte offset {exc.start}: {exc.reason}); convert it "
                          "first, e.g. `iconv -f <its encoding> -t UTF-8`") from None
    out = rd.data / "tokenizer_sample.txt"
    atomic_write_bytes(out, sample)
    return out


def _whole_characters(data: bytes) -> bytes:
    """``data`` without a UTF-8 character that its end cuts short."""
    lead = len(data) - 1
    while lead >= 0 and len(data) - lead < 4 and data[lead] & 0xC0 == 0x80:  # back over continuation bytes
        lead -= 1
    if lead < 0 or data[lead] < 0xC0:
        return data
    width = 2 if data[lead] < 0xE0 else 3 if data[lead] < 0xF0 else 4
    return data[:lead] if lead + width > len(data) else data


@dataclass
class SourceTokenizer:
    """A ``data.tokenizer_dir`` as read once: its directory, parsed files and SHA-256."""

    path: Path
    vocab: dict[int, bytes]
    merges: list[tuple[bytes, bytes]]
    sha256: str


def _build(vocab, merges, cfg: TrainConfig, where: Path) -> Tokenizer:
    tokenizer = Tokenizer(vocab, merges, list(cfg.data.special_tokens))
    check_tokenizer_fits(max(tokenizer.vocab) + 1, cfg.model.vocab_size, tokenizer=f"the tokenizer in {where}")
    return tokenizer


def source_tokenizer(cfg: TrainConfig) -> SourceTokenizer | None:
    """Read and check ``data.tokenizer_dir`` (None without one); before any work, once per run."""
    if cfg.data.tokenizer_dir is None:
        return None
    src = Path(cfg.data.tokenizer_dir)
    for name in ("vocab.json", "merges.txt"):
        if not (src / name).is_file():
            raise ConfigError(f"data.tokenizer_dir {src} has no {name}; point it at a directory "
                              "holding vocab.json and merges.txt")
    vocab, merges = load_vocab_merges(src / "vocab.json", src / "merges.txt")
    meta = load_meta(src)  # the special tokens of a `python -m cs336.tokenizer train` directory
    if meta is not None and set(meta.get("special_tokens", [])) != set(cfg.data.special_tokens):
        listed = list(meta.get("special_tokens", []))
        raise ConfigError(f"data.tokenizer_dir {src} was trained with the special tokens {listed!r} "
                          f"({src / META_FILE}), but data.special_tokens is {list(cfg.data.special_tokens)!r}; "
                          f"pass --data.special_tokens={','.join(listed)} (the first separates documents)")
    _build(vocab, merges, cfg, src)
    return SourceTokenizer(src, vocab, merges, tokenizer_hash(src))


def _tokenizer(cfg: TrainConfig, rd: RunDir, train_text: Path | None, say,
               source: SourceTokenizer | None) -> tuple[Tokenizer, str]:
    """The run's tokenizer in ``rd.tokenizer`` and its SHA-256: copied from ``source``, kept when
    its key matches, else trained on ``train_text``."""
    specials = list(cfg.data.special_tokens)
    key_path = rd.tokenizer / TOKENIZER_KEY
    if cfg.data.tokenizer_dir is not None:
        source = source or source_tokenizer(cfg)
        assert source is not None  # source_tokenizer returns one when data.tokenizer_dir is set
        key: dict[str, Any] = {"copied_from": str(source.path.resolve()), "sha256": source.sha256}
        if source.path.resolve() != rd.tokenizer.resolve() and _read_key(key_path) != key:
            key_path.unlink(missing_ok=True)
            for name in ("vocab.json", "merges.txt"):
                atomic_write_bytes(rd.tokenizer / name, (source.path / name).read_bytes())
            _write_key(key_path, key)
        return _build(source.vocab, source.merges, cfg, source.path), source.sha256
    assert train_text is not None  # no tokenizer_dir: not a tokens source (it needs one), so the caller passed the text
    key = {"train_text": file_key(train_text), "vocab_size": cfg.model.vocab_size,
           "special_tokens": specials, "sample_mb": cfg.data.tokenizer_sample_mb}
    have_files = rd.vocab_path.is_file() and rd.merges_path.is_file()
    old = _read_key(key_path)
    if have_files and old == key:
        vocab, merges = load_vocab_merges(rd.vocab_path, rd.merges_path)
    else:
        if have_files:
            say(f"the tokenizer in {rd.tokenizer} was made from {_differences(old, key)}; training it again")
        key_path.unlink(missing_ok=True)
        sample = _tokenizer_sample(train_text, rd, cfg.data.tokenizer_sample_mb, specials[0])
        say(f"training a {cfg.model.vocab_size}-token BPE tokenizer on {sample} "
            f"({sample.stat().st_size / 1e6:.1f} MB)")
        try:
            vocab, merges = train_bpe(str(sample), cfg.model.vocab_size, specials)
        except (ValueError, OSError) as exc:  # unreadable or non-UTF-8 input; the message names it
            raise ConfigError(str(exc)) from None
        save_vocab_merges(vocab, merges, rd.vocab_path, rd.merges_path)
        _write_key(key_path, key)
    return _build(vocab, merges, cfg, rd.tokenizer), tokenizer_hash(rd.tokenizer)


def check_tokens(tokens: np.ndarray, path: Path, cfg: TrainConfig) -> None:
    """Raise TokenFileError if ``tokens`` cannot feed this model (see the module docstring)."""
    need = cfg.context_length + 1
    if len(tokens) < need:
        raise TokenFileError(f"token file {path} holds {len(tokens)} tokens, fewer than one window of "
                             f"context_length + 1 = {need}; use more text or a shorter "
                             "--train.context_length")
    top, low = 0, 0
    for start in range(0, len(tokens), 1 << 24):
        block = np.asarray(tokens[start:start + (1 << 24)])
        top, low = max(top, int(block.max())), min(low, int(block.min()))
    if low < 0:  # a signed dtype: an embedding lookup would wrap it to the last rows, the loss would fail
        raise TokenFileError(f"token file {path} holds id {low}, below 0: it was written with a signed dtype "
                             "from other values or is read with the wrong dtype; re-encode it or fix its "
                             ".json sidecar")
    if top >= cfg.model.vocab_size:
        raise TokenFileError(f"token file {path} holds id {top}, beyond model.vocab_size="
                             f"{cfg.model.vocab_size}: it was encoded with another tokenizer or is read "
                             "with the wrong dtype; re-encode it or fix its .json sidecar")


def check_tokenizer_of(path: Path, tok_hash: str, tok_dir: Path) -> None:
    """Refuse a token file whose sidecar names another tokenizer than ``tok_dir`` (files
    without a recorded hash pass: ``check_tokens`` still bounds their ids)."""
    meta = _read_key(sidecar_path(path)) or {}
    recorded = meta.get("tokenizer_hash")
    if recorded is not None and recorded != tok_hash:
        raise TokenFileError(f"token file {path} was encoded with another tokenizer (SHA-256 {recorded[:12]}...) "
                             f"than the one in {tok_dir} ({tok_hash[:12]}...); re-encode it with that "
                             "tokenizer or pass the matching --data.tokenizer_dir")


def prepare_data(cfg: TrainConfig, rd: RunDir, info: dist_utils.DistInfo, say,
                 source: SourceTokenizer | None = None):
    """(train tokens, valid tokens, tokenizer; None on ranks other than 0); ``source``: the
    ``data.tokenizer_dir`` as ``source_tokenizer`` read it (read here when not given)."""
    tokenizer, tok_hash = None, None
    if cfg.data.source == "tokens":
        # data.source == "tokens" is the source of a config giving both token files
        paths = (Path(cast(str, cfg.data.train_tokens)), Path(cast(str, cfg.data.valid_tokens)))
        if info.is_main:
            tokenizer, tok_hash = _tokenizer(cfg, rd, None, say, source)
    else:
        paths = (rd.data / "train.bin", rd.data / "valid.bin")
        if info.is_main:
            train_text, valid_text = _text_paths(cfg, rd, say)
            tokenizer, tok_hash = _tokenizer(cfg, rd, train_text, say, source)
            for text, path in zip((train_text, valid_text), paths, strict=True):
                stale = token_file_is_current(path, text, tok_hash)
                if stale is None:
                    continue
                if path.exists():
                    say(f"{path} is stale ({stale}); encoding it again")
                say(f"encoding {text} -> {path}")
                big = text.stat().st_size > PARALLEL_ENCODE_BYTES
                workers = min(os.cpu_count() or 1, 8) if big else 1
                try:
                    encode_file(text, path, tokenizer, workers=workers, progress=cfg.train.progress,
                                tokenizer_hash=tok_hash)
                except (ValueError, OSError) as exc:  # e.g. non-UTF-8 text; the message names it
                    raise ConfigError(str(exc)) from None
    dist_utils.barrier(info)
    if info.enabled:
        tok_hash = dist_utils.broadcast_object(tok_hash, info)
    assert tok_hash is not None  # rank 0 computed it; the others received it by broadcast
    arrays = []
    for path in paths:
        tokens = load_tokens(path)
        check_tokenizer_of(path, tok_hash, rd.tokenizer)
        check_tokens(tokens, path, cfg)
        arrays.append(tokens)
    return arrays[0], arrays[1], tokenizer
