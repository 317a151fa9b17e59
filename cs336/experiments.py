"""The CS336 handout's experiments, one command each.

    python -m cs336.experiments sgd-toy [--lrs 1e1,1e2,1e3] [--steps 10] [--seed 0]
    python -m cs336.experiments list
    python -m cs336.experiments run lr|batch|norm|rope|ffn [--preset NAME] [--config FILE] [--out-dir DIR]
        [--section.field=VALUE ...] [--set key=value ...] [--grid KEY=V1,V2,...]

``sgd-toy`` is the handout's learning-rate toy (problem learning_rate_tuning, ``cs336.sgd_toy``): loss
``mean(w ** 2)`` of a seeded 10x10 ``5 * randn``, SGD with step ``lr / sqrt(t + 1)``, the loss printed
per step for each lr (1e1 shrinks slowly, 1e2 converges fast, 1e3 diverges). ``run NAME`` runs a
comparison recorded in EXPERIMENTS.md through ``cs336.sweep`` into ``runs/experiments/NAME``; deviation
from the handout: the default config shortened by ``SCALE`` to fit minutes on a 2-core CPU. Flags stack as
preset and ``--config`` (or ``--base``) file, ``SCALE``, ``--section.field``, ``--set``; ``--grid`` replaces
the named points at the same scale.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cs336 import config as cfglib
from cs336 import config_io, presets, sweep
from cs336.cli import (
    add_config_arguments,
    add_deprecated_alias,
    base_config,
    overrides_from_args,
    parse_args,
    positive_int,
)


def __getattr__(name: str):
    """``SGD`` and ``sgd_toy`` live in ``cs336.sgd_toy`` (torch is imported only when used, so
    ``--help`` stays fast)."""
    if name in ("SGD", "sgd_toy"):
        from cs336 import sgd_toy

        return getattr(sgd_toy, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def format_sgd_toy(results: dict[float, list[float]]) -> str:
    """A table: one row per step, one column per learning rate."""
    lrs = list(results)
    steps = max(len(v) for v in results.values())
    header = ["step"] + [f"lr={lr:g}" for lr in lrs]
    rows = [[str(t)] + [f"{results[lr][t]:.4g}" for lr in lrs] for t in range(steps)]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in [header, *rows])


Points = Callable[[cfglib.TrainConfig], list[dict[str, str]]]


@dataclass(frozen=True)
class Experiment:
    question: str
    """What the runs compare."""
    points: Points
    """The sweep points, computed from the base config (after the common and --set overrides)."""


SCALE = ("model.vocab_size=512", "model.context_length=64", "model.d_model=64", "model.num_layers=2",
         "model.num_heads=4", "model.d_ff=192", "data.corpus_mb=1", "train.batch_size=16",
         "train.max_steps=60", "train.eval_interval=10", "train.eval_batches=4", "train.log_interval=5",
         "train.checkpoint_interval=60", "train.sample_tokens=0", "train.progress=false",
         "optim.warmup_iters=6")
"""Common overrides of every experiment: 60 steps of a 2-layer, d_model 64 model (172,352
parameters, 106,816 outside the embeddings) on 1 MB of the embedded corpus, 1,024 tokens per
step; one run takes 6 s to 2 min on the 2-core development machine, depending on its load.
--set overrides any of them (e.g. --set train.max_steps=1000)."""


def _axis(key: str, *values: str) -> Points:
    return lambda base: [{key: v} for v in values]


def _ffn_points(base: cfglib.TrainConfig) -> list[dict[str, str]]:
    # SwiGLU has three d_model x d_ff matrices, the SiLU FFN two: d_ff x 1.5 matches the parameters
    # (the handout's 8/3 d_model versus 4 d_model).
    return [{"model.ffn_type": "swiglu"},
            {"model.ffn_type": "silu", "model.d_ff": str(round(1.5 * base.model.d_ff))}]


EXPERIMENTS: dict[str, Experiment] = {
    "lr": Experiment("learning rate, up to the edge of stability",
                     _axis("optim.lr", "1e-3", "3e-3", "1e-2", "3e-2", "1e-1", "3e-1", "1")),
    "batch": Experiment("batch size at a fixed token budget (steps scaled by the sweep)",
                        _axis("train.batch_size", "8", "16", "32", "64")),
    "norm": Experiment("pre-norm versus post-norm versus no RMSNorm",
                       lambda base: [{"model.use_post_norm": post, "model.remove_rmsnorm": off}
                                     for post, off in (("false", "false"), ("true", "false"),
                                                       ("false", "true"))]),
    "rope": Experiment("RoPE versus no positional encoding (NoPE)",
                       _axis("model.remove_rope", "false", "true")),
    "ffn": Experiment("SwiGLU versus a SiLU FFN with matched parameter count", _ffn_points),
}


def run_experiment(name: str, base: cfglib.TrainConfig, sets: Sequence[str], out: Path,
                   grids: Sequence[str] = ()) -> int:
    """Run experiment ``name`` as a sweep into ``out``; ``grids`` (``KEY=V1,V2`` strings) replace
    its points. Returns the sweep's exit status."""
    try:
        scaled = config_io.apply_overrides(base, [*SCALE, *sets])
    except cfglib.ConfigError as exc:
        raise sweep.SweepError(f"--set: {exc}") from None
    if grids:
        points = sweep.grid_points([sweep.parse_grid(g) for g in grids])
    else:
        points = EXPERIMENTS[name].points(scaled)
    planned = sweep.plan_sweep(scaled, points, [], out)
    previous = sweep.open_sweep_dir(out, planned)  # the same command again continues the sweep
    return sweep.run_and_report(sweep.share_data(planned, out), out, previous)


def _parse_lrs(text: str) -> list[float]:
    try:
        lrs = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--lrs {text!r}: expected comma-separated numbers, e.g. --lrs 1e1,1e2,1e3") from None
    if not lrs or any(not (lr >= 0 and math.isfinite(lr)) for lr in lrs):
        raise argparse.ArgumentTypeError(f"--lrs {text!r}: expected non-negative finite numbers")
    if any(lr > FLOAT32_MAX for lr in lrs):  # the step's alpha must fit the float32 weights
        raise argparse.ArgumentTypeError(f"--lrs {text!r}: the weights are float32, so a learning rate must be "
                                         f"at most {FLOAT32_MAX:.4g}")
    if len(set(lrs)) < len(lrs):  # one column per learning rate: a repeat would silently vanish
        raise argparse.ArgumentTypeError(f"--lrs {text!r}: a learning rate is listed twice; list each once")
    return lrs


FLOAT32_MAX = 3.4028234663852886e38


def _seed(text: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed {text!r}: expected an integer") from None
    if not 0 <= seed < 2**63:  # what torch.Generator.manual_seed takes without overflow
        raise argparse.ArgumentTypeError(f"--seed {text!r}: expected an integer in [0, 2**63)")
    return seed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cs336.experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    toy = sub.add_parser("sgd-toy", help="the handout's SGD learning-rate toy")
    toy.add_argument("--lrs", type=_parse_lrs, default=[1e1, 1e2, 1e3],
                     help="comma-separated learning rates (default 1e1,1e2,1e3)")
    toy.add_argument("--steps", type=positive_int, default=10, help="SGD steps (default 10)")
    toy.add_argument("--seed", type=_seed, default=0, help="seed for the initial weights (default 0)")
    sub.add_parser("list", help="list the named experiments")
    run = sub.add_parser("run", help="run one named experiment as a sweep")
    run.add_argument("name", choices=sorted(EXPERIMENTS), help="experiment")
    add_config_arguments(run, config_aliases=("--base",), without=("--out-dir",))
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                     help="same as --KEY=VALUE: applied to every run, after the experiment's scale settings")
    run.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                     help="replace the experiment's points by this grid (repeatable, as in cs336.sweep)")
    run.add_argument("--out-dir", type=Path, default=None,
                     help="sweep directory (default runs/experiments/NAME); the same command again continues it")
    add_deprecated_alias(run, "--out", "--out-dir", type=Path)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(build_parser(), argv)
    if args.command == "sgd-toy":
        from cs336.sgd_toy import sgd_toy

        results = {lr: sgd_toy(lr, args.steps, args.seed) for lr in args.lrs}
        print(format_sgd_toy(results))
        verdicts = []
        for lr, losses in results.items():
            if not all(math.isfinite(v) for v in losses) or losses[-1] > losses[0]:
                verdicts.append(f"lr={lr:g} diverges")
            else:
                verdicts.append(f"lr={lr:g} {losses[0]:.3g} -> {losses[-1]:.3g}")
        print("summary: " + "; ".join(verdicts))
    elif args.command == "list":
        base = config_io.apply_overrides(presets.default_config(), list(SCALE))
        for name, exp in EXPERIMENTS.items():
            points = [sweep.point_name(p) for p in exp.points(base)]
            print(f"{name}: {exp.question}\n    points: {'; '.join(points)}")
        print("common settings: " + " ".join(SCALE))
    elif args.command == "run":
        from cs336.cli import run_cli

        out = args.out_dir or Path("runs") / "experiments" / args.name
        status = {}

        def body() -> None:
            base = base_config(args)
            if args.config:
                base = config_io.load_config(args.config, base)
            overrides = [*overrides_from_args(args), *args.sets]
            status["code"] = run_experiment(args.name, base, overrides, out, args.grid)

        run_cli(body, user_errors=(sweep.SweepError, cfglib.ConfigError),
                on_interrupt=lambda: f"finished points are kept in {out}; run the same command again "
                                     "to continue")
        if status.get("code"):
            sys.exit(status["code"])


if __name__ == "__main__":
    main()
