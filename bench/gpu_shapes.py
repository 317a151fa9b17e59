"""The model presets' parameter shapes, as data for the GPU compile gate's AdamW cases.

    python bench/gpu_shapes.py --out shapes.json [--presets gpt2-small,gpt2-xl]
    python -m kernels.gpu_check --param-shapes shapes.json

kernels/ imports nothing of cs336, so the gate cannot build a model itself: this script builds
each ``MODEL_PRESETS`` model (``cs336.presets``) on the ``meta`` device (no memory) and writes
``{preset: [shape, ...]}`` in parameter order, which ``kernels.gpu_cases.add_param_groups`` reads.
The default is every preset (the gate's ``--full`` matrix); tests pass ``gpt2-small`` alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _presets() -> dict:
    from cs336.presets import MODEL_PRESETS

    return MODEL_PRESETS


def param_groups(presets: list[str] | None = None) -> dict[str, list[list[int]]]:
    """``{preset: [shape, ...]}`` of the TransformerLM of each preset (all presets by default)."""
    from cs336.model import TransformerLM

    MODEL_PRESETS = _presets()
    groups = {}
    for name in presets or list(MODEL_PRESETS):
        model = TransformerLM(**dataclasses.asdict(MODEL_PRESETS[name]()), device="meta")
        groups[name] = [list(p.shape) for p in model.parameters()]
    return groups


def main(argv: list[str] | None = None) -> int:
    from cs336.fileio import atomic_write_text

    MODEL_PRESETS = _presets()
    parser = argparse.ArgumentParser(prog="bench/gpu_shapes.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--presets", default="", help=f"comma list of {', '.join(MODEL_PRESETS)} (default: all)")
    args = parser.parse_args(argv)
    presets = [p for p in args.presets.split(",") if p]
    bad = [p for p in presets if p not in MODEL_PRESETS]
    if bad:
        parser.error(f"--presets: unknown {', '.join(bad)}; valid: {', '.join(MODEL_PRESETS)}")
    atomic_write_text(args.out, json.dumps(param_groups(presets), indent=0) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
