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
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

from .gpt2_files import TokenizerFileError, load_tokenizer_dir, save_tokenizer_dir, tokenizer_hash


def _peak_rss_mb() -> float:
    """Peak resident memory of this process and of its finished children, in MB (Linux reports
    ru_maxrss in KiB, macOS in bytes)."""
    scale = 1 if sys.platform == "darwin" else 1024
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) * scale / 1e6


def _train(args: argparse.Namespace) -> None:
    from .train_bpe import train_bpe

    src = Path(args.input)
    if not src.is_file():
        raise ValueError(f"{src}: no such file; pass an existing text file with --input")
    specials = list(dict.fromkeys(args.special_token))
    if args.vocab_size < 256 + len(specials):
        raise ValueError(
            f"--vocab-size {args.vocab_size} is below 256 byte tokens + {len(specials)} special "
            f"tokens; pass at least {256 + len(specials)}"
        )
    start = time.perf_counter()
    vocab, merges = train_bpe(src, args.vocab_size, specials, num_workers=args.workers, progress=True)
    seconds = time.perf_counter() - start
    save_tokenizer_dir(args.out, vocab, merges, specials)
    special_bytes = {s.encode("utf-8") for s in specials}
    longest = max((t for t in vocab.values() if t not in special_bytes), key=len)
    print(
        f"trained {len(vocab)} tokens ({len(merges)} merges) on {src} in {seconds:.2f} s; "
        f"peak memory {_peak_rss_mb():.0f} MB; longest token {longest!r} ({len(longest)} bytes); "
        f"wrote {args.out}/vocab.json, merges.txt, tokenizer.json"
    )


def _encode(args: argparse.Namespace) -> None:
    from .encode_file import encode_file
    from .tokenizer import Tokenizer

    vocab, merges, specials = load_tokenizer_dir(args.tokenizer)
    tokenizer = Tokenizer(vocab, merges, specials)
    stats = encode_file(
        args.input,
        args.out,
        tokenizer,
        workers=args.workers,
        tokenizer_hash=tokenizer_hash(args.tokenizer),
        progress=not args.quiet,
    )
    print(
        f"encoded {stats.input_bytes / 1e6:.2f} MB into {stats.tokens} {stats.dtype} tokens "
        f"({stats.bytes_per_token:.2f} bytes/token) in {stats.seconds:.2f} s "
        f"({stats.mb_per_s:.1f} MB/s, {args.workers} worker(s)); wrote {args.out} and {args.out}.json"
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
    train.add_argument("--out", required=True, help="directory for vocab.json, merges.txt, tokenizer.json")
    train.add_argument("--workers", type=int, default=None, help="pre-tokenization processes (default: all cores)")
    train.set_defaults(run=_train)

    enc = sub.add_parser("encode", help="encode a text file to a flat token file")
    enc.add_argument("--tokenizer", required=True, help="directory written by `train`")
    enc.add_argument("--input", required=True, help="UTF-8 text file to encode")
    enc.add_argument("--out", required=True, help="token file to write (a .json sidecar is written beside it)")
    enc.add_argument("--workers", type=int, default=1, help="encoding processes (default 1)")
    enc.add_argument("--quiet", action="store_true", help="no progress bar")
    enc.set_defaults(run=_encode)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (TokenizerFileError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
