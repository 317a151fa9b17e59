"""The main job: train a Transformer LM end to end and sample from it.

    python -m cs336.train                                  # embedded corpus, CPU, minutes
    python -m cs336.train --out-dir runs/a --max-steps 2000 --optim.lr=1e-3
    python -m cs336.train --out-dir runs/a --resume        # continue exactly where it stopped
    python -m cs336.train --preset tinystories --train-text TS-train.txt --valid-text TS-valid.txt
    python -m cs336.train --preset tinystories --dataset tinystories   # downloads the files
    python -m cs336.train --train.grad_accum_steps=4       # same batch, 4 micro-batches per step
    torchrun --nproc_per_node=8 -m cs336.train --preset tinystories --dataset tinystories

This module is the command line: flags to a ``TrainConfig`` (``cs336.cli``; for ``--resume`` the
run's config.json plus the flags, refused when a flag changes what the run cannot continue with,
``cs336.preflight.resume_conflicts``), then ``cs336.trainer.run`` under ``run_cli``: a user error
is one line and exit 2, divergence exit 1, an interruption outside the loop one line and 130/143.
What each failure does is the README's "What happens when".
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from cs336.cli import add_config_arguments, config_from_args, overrides_from_args, parse_args, run_cli
from cs336.config import ConfigError, TrainConfig
from cs336.config_io import apply_overrides, load_config
from cs336.run_dir import RunDir

if TYPE_CHECKING:
    from cs336.trainer import TrainingDiverged, run


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message is the whole story for the user: one line, exit status 2 (imported
    here on use: most of them come with torch)."""
    from cs336.checkpoint import CheckpointError
    from cs336.data import TokenFileError
    from cs336.datasets import DatasetError
    from cs336.ops import BackendError
    from cs336.preflight import FlagError
    from cs336.run_dir import RunDirError, RunDirRefused
    from cs336.tokenizer.gpt2_files import TokenizerFileError

    return (ConfigError, CheckpointError, TokenFileError, DatasetError, BackendError, RunDirError,
            RunDirRefused, TokenizerFileError, FlagError)


def __getattr__(name: str):
    """``run``, ``TrainingDiverged`` (``cs336.trainer``) and ``USER_ERRORS``, imported on first use
    so that ``--help`` does not pay the torch import."""
    if name in ("run", "TrainingDiverged"):
        from cs336 import trainer

        return getattr(trainer, name)
    if name == "USER_ERRORS":
        return user_errors()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["TrainingDiverged", "build_parser", "config_for", "main", "run"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cs336.train", description=__doc__.split("\n\n")[0],
                                usage="%(prog)s [--resume] [--preset NAME] [--model NAME] [--config FILE] "
                                      "[--section.field=VALUE ...]  (--help lists every field)",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out-dir from its latest checkpoint (its config.json is "
                        "the base; flags such as --max-steps apply on top)")
    add_config_arguments(p)
    return p


def config_for(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of a command line (for --resume: the run's config.json plus the flags)."""
    if not args.resume:
        return config_from_args(args)
    overrides = overrides_from_args(args)
    out = next((o.split("=", 1)[1] for o in overrides if o.startswith("train.out_dir=")), None)
    if out is None:
        raise ConfigError("--resume needs the run directory: pass --out-dir DIR")
    if args.preset or args.model:
        raise ConfigError("--resume takes its config from DIR/config.json; drop --preset and --model")
    saved = RunDir(out).read_config()
    cfg = load_config(args.config, saved) if args.config else saved
    cfg = apply_overrides(cfg, overrides)
    from cs336.config_io import config_to_dict
    from cs336.preflight import resume_conflicts

    conflicts = resume_conflicts(config_to_dict(saved), config_to_dict(cfg))
    if conflicts:
        raise ConfigError(f"--resume: these flags differ from {RunDir(out).config_file}, and the run cannot "
                          f"continue with them: {'; '.join(conflicts)}. Drop them, or start a new run "
                          "in another --out-dir")
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)  # before the torch import: --help stays fast
    from cs336.interrupt import Stage

    module = sys.modules[__name__]
    stage = Stage()
    train_run, diverged = module.run, module.TrainingDiverged  # as patched, if a test replaced them
    run_cli(lambda: train_run(config_for(args), resume=args.resume, stage=stage), user_errors=user_errors(),
            exit_codes={diverged: 1}, on_interrupt=stage.report)
    return 0


if __name__ == "__main__":
    main()
