"""GPT-2 tokenizer file formats: ``vocab.json`` and ``merges.txt``.

GPT-2 (Radford et al. 2019, ``encoder.py`` in openai/gpt-2) stores tokens as printable strings:
each byte maps to one unicode character (printable Latin-1 bytes map to themselves, the other 68
bytes to U+0100 onwards, in byte order). ``vocab.json`` maps that string to the token id;
``merges.txt`` holds one merge per line, the two token strings separated by one space, in merge
order, optionally after a ``#version`` header line. HF ``tokenizers`` (``BPE.from_file``) and
tiktoken (after decoding the strings back to bytes) read these files.

Loading validates everything a user could get wrong, as a whole and before any work, and raises
``TokenizerFileError`` naming the file, the line and the fix: the files are UTF-8 JSON/text of the
right types; vocab ids are exactly 0..N-1 (dense, so no id can make a reader allocate past the
vocabulary: a stray id of 2,000,000,000 is refused, not allocated); no token string appears twice;
each merge's two parts and its result are vocabulary entries; in a tokenizer directory every
multi-byte token other than a special token is made by a merge, and the counts and special
tokens recorded in ``tokenizer.json`` match the two files. Saving writes both files atomically (temporary
file in the same directory, then ``os.replace``).
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

from cs336.fileio import atomic_write_text
from cs336.tokenizer.pretokenize import check_special_token_text


class TokenizerFileError(ValueError):
    """A vocab.json / merges.txt / tokenizer.json that cannot be used; the message names the file."""


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (a bijection on 256 values)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    """The inverse of ``bytes_to_unicode``."""
    return {c: b for b, c in bytes_to_unicode().items()}


def token_to_str(token: bytes) -> str:
    """A token's GPT-2 file spelling."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


@lru_cache(maxsize=1)
def _to_latin1_table() -> dict[int, str]:
    """str.translate table: alphabet character -> chr(its byte); any other character below 256
    -> U+FFFF, which latin-1 cannot encode (so such characters fail instead of passing through)."""
    table = {ord(c): chr(b) for c, b in unicode_to_bytes().items()}
    for code in range(256):
        table.setdefault(code, "\uffff")
    return table


def str_to_token(text: str) -> bytes:
    """Bytes of a GPT-2 file spelling; KeyError on a character outside the 256-character map."""
    try:
        return text.translate(_to_latin1_table()).encode("latin-1")
    except UnicodeEncodeError:
        table = unicode_to_bytes()
        return bytes(table[c] for c in text)


def save_vocab_merges(
    vocab: dict[int, bytes],
    merges: list[tuple[bytes, bytes]],
    vocab_path: str | os.PathLike,
    merges_path: str | os.PathLike,
) -> None:
    """Write ``vocab`` and ``merges`` in GPT-2 format, each file atomically.

    Special tokens are written with the same byte-to-unicode spelling as any other token (HF and
    the CS336 reference files do the same); ``tokenizer.json`` names which ones are special.
    """
    spelled: dict[str, int] = {}
    for idx in sorted(vocab):
        key = token_to_str(vocab[idx])
        if key in spelled:
            raise ValueError(
                f"vocab ids {spelled[key]} and {idx} hold the same bytes {vocab[idx]!r}; "
                "vocab.json maps each token to one id, so remove the duplicate"
            )
        spelled[key] = idx
    lines = [f"{token_to_str(a)} {token_to_str(b)}" for a, b in merges]
    atomic_write_text(Path(vocab_path), json.dumps(spelled, ensure_ascii=False, indent=0) + "\n")
    atomic_write_text(Path(merges_path), "#version: 0.2\n" + "".join(line + "\n" for line in lines))


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenizerFileError(f"{path}: {what} not found; pass the path of an existing file") from None
    except IsADirectoryError:
        raise TokenizerFileError(f"{path}: is a directory; pass the path of the {what} file") from None
    except UnicodeDecodeError as exc:
        raise TokenizerFileError(f"{path}: {what} is not UTF-8 ({exc.reason} at byte {exc.start}); it is "
                                 "damaged or another kind of file: write the tokenizer again") from None
    except OSError as exc:
        raise TokenizerFileError(f"{path}: cannot read {what} ({exc.strerror})") from None


def _parse_json(path: Path, text: str, what: str):
    """JSON of ``text``; duplicate object keys are an error (json keeps the last silently)."""
    if not text.strip():
        raise TokenizerFileError(f"{path}: {what} is empty; write the tokenizer again "
                                 "(python -m cs336.tokenizer train ...)")

    def no_duplicates(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise TokenizerFileError(f"{path}: token {key!r} appears twice; each token maps to one id, "
                                         "so remove the duplicate")
            seen.add(key)
        return dict(pairs)

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise TokenizerFileError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); "
                                 f"the {what} is damaged: write it again") from None
    except RecursionError:
        raise TokenizerFileError(f"{path}: nested too deeply to be a {what}") from None


def load_vocab(vocab_path: str | os.PathLike) -> dict[int, bytes]:
    """Read a GPT-2 ``vocab.json`` into ``{id: bytes}``; ids must be exactly 0..N-1."""
    path = Path(vocab_path)
    raw = _parse_json(path, _read_text(path, "vocab.json"), "vocab.json")
    if not isinstance(raw, dict):
        raise TokenizerFileError(
            f"{path}: expected a JSON object mapping token strings to ids, got {type(raw).__name__}"
        )
    vocab: dict[int, bytes] = {}
    for key, idx in raw.items():
        if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
            raise TokenizerFileError(
                f"{path}: token {key!r} has id {idx!r}; ids must be non-negative integers"
            )
        try:
            token = str_to_token(key)
        except KeyError as exc:
            raise TokenizerFileError(
                f"{path}: token {key!r} contains {exc.args[0]!r}, which is not in GPT-2's "
                "byte-to-unicode alphabet; the file is not in GPT-2 format"
            ) from None
        if idx in vocab:
            raise TokenizerFileError(f"{path}: id {idx} is used by two tokens; each id must be unique")
        vocab[idx] = token
    if not vocab:
        raise TokenizerFileError(f"{path}: the vocabulary is empty")
    n = len(vocab)
    top = max(vocab)
    if top >= n:
        missing = next(i for i in range(n) if i not in vocab)
        raise TokenizerFileError(
            f"{path}: ids must be 0..{n - 1} for {n} tokens, but id {top} occurs and id {missing} is "
            "missing; renumber the vocabulary densely (or train the tokenizer again)"
        )
    return vocab


def load_merges(
    merges_path: str | os.PathLike, vocab: dict[int, bytes] | None = None
) -> list[tuple[bytes, bytes]]:
    """Read a GPT-2 ``merges.txt``; with ``vocab``, check that both halves and the merged token
    are vocabulary entries."""
    path = Path(merges_path)
    text = _read_text(path, "merges.txt")
    known = set(vocab.values()) if vocab is not None else None
    merges: list[tuple[bytes, bytes]] = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if lineno == 1 and line.startswith("#version"):
            continue
        line = line.rstrip("\r")
        if not line:
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise TokenizerFileError(
                f"{path}:{lineno}: expected two tokens separated by one space, got {line!r}"
            )
        try:
            pair = (str_to_token(parts[0]), str_to_token(parts[1]))
        except KeyError as exc:
            raise TokenizerFileError(
                f"{path}:{lineno}: {exc.args[0]!r} is not in GPT-2's byte-to-unicode alphabet; "
                "the file is not in GPT-2 format"
            ) from None
        if known is not None:
            for piece, spelling in ((pair[0], parts[0]), (pair[1], parts[1]), (pair[0] + pair[1], None)):
                if piece not in known:
                    name = repr(spelling) if spelling is not None else f"merged token {parts[0] + parts[1]!r}"
                    raise TokenizerFileError(
                        f"{path}:{lineno}: {name} is not in the vocabulary; "
                        "vocab.json and merges.txt must come from the same tokenizer"
                    )
        merges.append(pair)
    return merges


def load_vocab_merges(
    vocab_path: str | os.PathLike, merges_path: str | os.PathLike
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Read and cross-check a ``vocab.json`` / ``merges.txt`` pair."""
    vocab = load_vocab(vocab_path)
    return vocab, load_merges(merges_path, vocab)


VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
META_FILE = "tokenizer.json"
"""A tokenizer directory holds these three files; ``tokenizer.json`` lists the special tokens."""


def save_tokenizer_dir(
    directory: str | os.PathLike,
    vocab: dict[int, bytes],
    merges: list[tuple[bytes, bytes]],
    special_tokens: list[str],
) -> None:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer.json`` into ``directory``."""
    out = Path(directory)
    save_vocab_merges(vocab, merges, out / VOCAB_FILE, out / MERGES_FILE)
    meta = {
        "format": "gpt2-byte-level-bpe",
        "special_tokens": list(special_tokens),
        "vocab_size": len(vocab),
        "num_merges": len(merges),
    }
    atomic_write_text(out / META_FILE, json.dumps(meta, ensure_ascii=False, indent=2) + "\n")


def load_meta(directory: str | os.PathLike) -> dict | None:
    """``directory/tokenizer.json`` checked for types (None when the file is absent)."""
    path = Path(directory) / META_FILE
    if not path.exists():
        return None
    meta = _parse_json(path, _read_text(path, META_FILE), META_FILE)
    specials = meta.get("special_tokens", []) if isinstance(meta, dict) else None
    if not isinstance(specials, list) or not all(isinstance(t, str) and t for t in specials):
        raise TokenizerFileError(
            f'{path}: expected an object with "special_tokens": a list of non-empty strings'
        )
    for key in ("vocab_size", "num_merges"):
        value = meta.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise TokenizerFileError(f"{path}: {key!r} is {value!r}; expected a non-negative integer "
                                     "(or delete the key)")
    return meta


def load_special_tokens(directory: str | os.PathLike) -> list[str]:
    """The special tokens listed in ``directory/tokenizer.json`` ([] when the file is absent)."""
    meta = load_meta(directory)
    return [] if meta is None else list(meta.get("special_tokens", []))


def check_tokenizer_dir(
    directory: Path, vocab: dict[int, bytes], merges: list[tuple[bytes, bytes]], meta: dict | None
) -> None:
    """Whole-directory consistency (see the module docstring); raises ``TokenizerFileError``."""
    specials = [] if meta is None else list(meta.get("special_tokens", []))
    meta_path = directory / META_FILE
    if meta is not None:
        for key, have in (("vocab_size", len(vocab)), ("num_merges", len(merges))):
            want = meta.get(key)
            if want is not None and want != have:
                raise TokenizerFileError(
                    f"{meta_path} records {key} {want} but {VOCAB_FILE}/{MERGES_FILE} hold {have}; the files "
                    "come from different trainings: train the tokenizer again into an empty directory"
                )
    made = {a + b for a, b in merges}
    special_bytes = {t.encode("utf-8") for t in specials}
    for idx in sorted(vocab):
        token = vocab[idx]
        if len(token) > 1 and token not in made and token not in special_bytes:
            where = f" and is not a special token of {meta_path}" if meta is not None else ""
            raise TokenizerFileError(
                f"{directory / VOCAB_FILE}: token {token_to_str(token)!r} (id {idx}) is made by no merge in "
                f"{directory / MERGES_FILE}{where}; vocab.json and merges.txt must come from the same "
                "tokenizer"
            )


def load_tokenizer_dir(
    directory: str | os.PathLike, special_tokens: list[str] | None = None,
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]], list[str]]:
    """Read a directory written by ``save_tokenizer_dir``: (vocab, merges, special_tokens).

    A directory without ``tokenizer.json`` (e.g. a training run's ``DIR/tokenizer``, whose
    special tokens are in the run's config) takes its special tokens from ``special_tokens``; a
    directory with one must be given none or the same ones (in any order): any other set is
    refused, since the file names the tokens the vocabulary was trained with."""
    path = Path(directory)
    if not path.is_dir():
        raise TokenizerFileError(
            f"{path}: not a directory; pass the --out-dir of `python -m cs336.tokenizer train` (or a "
            "training run's DIR/tokenizer)"
        )
    for token in special_tokens or ():
        check_special_token_text(token, TokenizerFileError)
    meta = load_meta(path)
    if meta is not None and special_tokens:
        listed = list(meta.get("special_tokens", []))
        if set(special_tokens) != set(listed):
            raise TokenizerFileError(
                f"{path / META_FILE} lists the special tokens {listed!r}, not {list(special_tokens)!r}; "
                f"drop --special-token (it names the special tokens of a directory without {META_FILE}) "
                "or train a tokenizer with the tokens you want"
            )
    if meta is None and special_tokens:
        meta = {"special_tokens": list(special_tokens)}
    vocab, merges = load_vocab_merges(path / VOCAB_FILE, path / MERGES_FILE)
    try:
        check_tokenizer_dir(path, vocab, merges, meta)
    except TokenizerFileError as exc:
        if meta is None and "is made by no merge" in str(exc):
            raise TokenizerFileError(
                f"{exc} (or it is a special token: {path} has no {META_FILE} listing them; pass each with "
                "--special-token)") from None
        raise
    return vocab, merges, [] if meta is None else list(meta.get("special_tokens", []))


def tokenizer_hash(directory: str | os.PathLike) -> str:
    """SHA-256 (hex) of ``vocab.json`` followed by ``merges.txt``: names the tokenizer a token
    file was made with."""
    digest = hashlib.sha256()
    for name in (VOCAB_FILE, MERGES_FILE):
        digest.update((Path(directory) / name).read_bytes())
    return digest.hexdigest()
