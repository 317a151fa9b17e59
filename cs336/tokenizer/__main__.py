"""Command line for the BPE tokenizer: train a vocabulary, encode a text file to token ids.

    python -m cs336.tokenizer train --input data/TinyStories-train.txt --vocab-size 10000 \\
        --special-token '<|endoftext|>' --out runs/tok10k
    python -m cs336.tokenizer encode --tokenizer runs/tok10k --input data/TinyStories-valid.txt \\
        --out data/valid.bin --workers 4

``train`` writes ``vocab.json`` and ``merges.txt`` (GPT-2 format) and ``tokenizer.json`` (the
special tokens) into ``--out`` and prints the time, peak memory and longest token. ``encode``
writes ``uint16`` ids (``uint32`` above 65,536 ids) and a ``.json`` sidecar (dtype, count,
tokenizer hash), and prints the compression ratio and throughput. Errors a user can cause print
one line and exit with status 2.

Neither command writes over its inputs: ``--out`` may not be the input text, a file of the
tokenizer directory being read, or (for ``train``) a directory whose vocab.json, merges.txt or
tokenizer.json is the input. SIGINT/SIGTERM end either command with one line saying what was
kept and status 130/143 (``cs336.interrupt.run_cli``); outputs are renamed into place only when
complete, so an interrupted command leaves the previous files (or none) and no temporary files.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

from cs336.cli import add_deprecated_alias, run_cli
from cs336.interrupt import Stage, deferred_signals

from .gpt2_files import (
    MERGES_FILE,
    META_FILE,
    VOCAB_FILE,
    TokenizerFileError,
    load_tokenizer_dir,
    save_tokenizer_dir,
    tokenizer_hash,
)


def _peak_rss_mb() -> float:
    """Peak resident memory of this process and of its finished children, in MB (Linux reports
    ru_maxrss in KiB, macOS in bytes)."""
    scale = 1 if sys.platform == "darwin" else 1024
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) * scale / 1e6


def _stamp(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _outcome(*paths: Path):
    """A function telling, at interruption time, what became of ``paths`` since now."""
    before = [_stamp(p) for p in paths]

    def tell() -> str:
        states = []
        for path, then in zip(paths, before, strict=True):
            now = _stamp(path)
            if now != then:
                states.append(f"{path} was written completely")
            else:
                states.append(f"{path} is unchanged" if now is not None else f"{path} was not created")
        return " and ".join(states) + " (no temporary files left)"

    return tell


def _check_input_file(src: Path) -> None:
    """Refuse an --input that is missing, a directory or not a regular file (e.g. /dev/null), each
    said as it is."""
    if not src.is_file():
        what = "is a directory" if src.is_dir() else "is not a regular file" if src.exists() else "does not exist"
        raise ValueError(f"--input {src} {what}; pass an existing UTF-8 text file with --input")


def _check_workers(workers: int | None) -> None:
    if workers is not None and workers < 1:
        raise ValueError(f"--workers {workers}: pass a number of processes >= 1")


def _train(args: argparse.Namespace, stage: Stage) -> None:
    src = Path(args.input)
    _check_input_file(src)
    _check_workers(args.workers)
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out-dir {out} is a file; pass a directory (it receives vocab.json, merges.txt, "
                         "tokenizer.json)")
    written = [(out / name).resolve() for name in (VOCAB_FILE, MERGES_FILE, META_FILE)]
    if src.resolve() in written:
        raise ValueError(f"--out-dir {out} would overwrite the input {src}; pass another --out-dir")
    specials = list(dict.fromkeys(args.special_token))
    if args.vocab_size < 256 + len(specials):
        raise ValueError(
            f"--vocab-size {args.vocab_size} is below 256 byte tokens + {len(specials)} special "
            f"tokens; pass at least {256 + len(specials)}"
        )
    size = src.stat().st_size
    if size == 0:
        raise ValueError(f"--input {src} is empty; pass a file with text in it")
    # Each merge joins two adjacent tokens of the input, so an input of n bytes makes at most
    # n - 1 merges; ids must also fit the uint32 token files.
    limit = min(256 + len(specials) + size - 1, 2**32)
    if args.vocab_size > limit:
        raise ValueError(f"--vocab-size {args.vocab_size} is more than {src} ({size:,} bytes) can make: at "
                         f"most {limit:,} (256 bytes + {len(specials)} special tokens + one merge per input "
                         "byte); pass a smaller --vocab-size or a larger --input")
    stage.doing = f"training a {args.vocab_size}-token BPE vocabulary on {src}"
    stage.kept = lambda: f"nothing was written to {out}"
    from .train_bpe import train_bpe

    start = time.perf_counter()
    vocab, merges = train_bpe(src, args.vocab_size, specials, num_workers=args.workers, progress=True)
    seconds = time.perf_counter() - start
    with deferred_signals():  # the three files are written together or not at all
        save_tokenizer_dir(args.out_dir, vocab, merges, specials)
        stage.kept = lambda: f"the tokenizer was written completely to {out}"
    special_bytes = {s.encode("utf-8") for s in specials}
    longest = max((t for t in vocab.values() if t not in special_bytes), key=len)
    print(
        f"trained {len(vocab)} tokens ({len(merges)} merges) on {src} in {seconds:.2f} s; "
        f"peak memory {_peak_rss_mb():.0f} MB; longest token {longest!r} ({len(longest)} bytes); "
        f"wrote {args.out_dir}/vocab.json, merges.txt, tokenizer.json"
    )


def _check_encode_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """Refuse an ``--out`` (or its ``.json`` sidecar) that is an input or lies in the tokenizer
    directory; return (input, out)."""
    src, out, tok = Path(args.input), Path(args.out), Path(args.tokenizer_dir)
    _check_input_file(src)
    _check_workers(args.workers)
    if out.is_dir() or args.out.endswith(("/", os.sep)):
        what = "is a directory" if out.is_dir() else "ends in a slash, so it names a directory"
        raise ValueError(f"--out {args.out} {what}; pass the path of the token file to write")
    if Path(f"{out}.json").is_dir():
        raise ValueError(f"--out {out}: its sidecar path {out}.json is a directory; pass another --out path "
                         "or move the directory")
    tok_dir = tok.resolve()
    for target in (out.resolve(), Path(f"{out}.json").resolve()):
        if target == src.resolve():
            raise ValueError(f"--out {out} would overwrite the input {src}; pass another --out path")
        if target.is_relative_to(tok_dir):
            raise ValueError(f"--out {out} lies inside the tokenizer directory {tok}, which this "
                             "command reads; write the token file elsewhere")
    return src, out


def _run_special_tokens(args: argparse.Namespace) -> list[str]:
    """--special-token, else, for a training run's DIR/tokenizer (a tokenizer directory without
    tokenizer.json), the run's data.special_tokens; a directory with tokenizer.json gets its own
    (``load_tokenizer_dir`` refuses a --special-token that differs from them)."""
    if args.special_token:
        return list(dict.fromkeys(args.special_token))
    if (Path(args.tokenizer_dir) / META_FILE).exists():
        return []
    config = Path(args.tokenizer_dir) / ".." / "config.json"
    try:
        specials = json.loads(config.read_text(encoding="utf-8"))["data"]["special_tokens"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return []
    return [t for t in specials if isinstance(t, str) and t] if isinstance(specials, list) else []


def _encode(args: argparse.Namespace, stage: Stage) -> None:
    src, out = _check_encode_paths(args)
    from .encode_file import encode_file
    from .tokenizer import Tokenizer

    stage.doing = f"loading the tokenizer in {args.tokenizer_dir}"
    vocab, merges, specials = load_tokenizer_dir(args.tokenizer_dir, _run_special_tokens(args))
    tokenizer = Tokenizer(vocab, merges, specials)
    stage.doing = f"encoding {src}"
    stage.kept = _outcome(out, Path(f"{out}.json"))
    stats = encode_file(
        args.input,
        args.out,
        tokenizer,
        workers=args.workers,
        tokenizer_hash=tokenizer_hash(args.tokenizer_dir),
        progress=not args.quiet,
    )
    print(
        f"encoded {stats.input_bytes / 1e6:.2f} MB into {stats.tokens} {stats.dtype} tokens "
        f"({stats.bytes_per_token:.2f} bytes/token) in {stats.seconds:.2f} s "
        f"({stats.mb_per_s:.1f} MB/s, {stats.workers} worker(s)); wrote {args.out} and {args.out}.json"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cs336.tokenizer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a byte-level BPE vocabulary on a text file")
    train.add_argument("--input", required=True, help="UTF-8 text file to train on")
    train.add_argument("--vocab-size", type=int, required=True, help="vocabulary size incl. 256 bytes and specials")
    train.add_argument(
        "--special-token", action="append", default=[], help="special token (repeat for several)"
    )
    train.add_argument("--out-dir", help="directory for vocab.json, merges.txt, tokenizer.json (required)")
    add_deprecated_alias(train, "--out", "--out-dir")
    train.add_argument("--workers", type=int, default=None,
                       help="pre-tokenization processes, at most one per MiB of input (default: all cores)")
    train.set_defaults(run=_train)

    enc = sub.add_parser("encode", help="encode a text file to a flat token file")
    enc.add_argument("--tokenizer-dir", help="directory written by `train` (required)")
    add_deprecated_alias(enc, "--tokenizer", "--tokenizer-dir")
    enc.add_argument("--input", required=True, help="UTF-8 text file to encode")
    enc.add_argument("--out", required=True, help="token file to write (a .json sidecar is written beside it)")
    enc.add_argument("--special-token", action="append", default=[],
                     help="special token of a tokenizer directory without tokenizer.json (repeat for several; "
                          "default: those in tokenizer.json, or the run's config for a run's DIR/tokenizer)")
    enc.add_argument("--workers", type=int, default=1, help="encoding processes (default 1)")
    enc.add_argument("--quiet", action="store_true", help="no progress bar")
    enc.set_defaults(run=_encode)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    required = {"train": ("out_dir", "--out-dir"), "encode": ("tokenizer_dir", "--tokenizer-dir")}[args.command]
    if getattr(args, required[0], None) is None:  # not argparse's required=: the old spelling also counts
        parser.error(f"{args.command}: the following arguments are required: {required[1]}")
    stage = Stage("starting")
    run_cli(lambda: args.run(args, stage), user_errors=(TokenizerFileError, ValueError, OSError),
            on_interrupt=stage.report)


if __name__ == "__main__":
    main()
