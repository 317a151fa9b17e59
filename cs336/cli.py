"""Command-line arguments generated from the config dataclasses.

Every field of every section becomes ``--section.field=VALUE`` (``--optim.lr=3e-4``,
``--model.d_model=128``; a bare ``--train.compile`` means true). Values are parsed and
type-checked by ``cs336.config.apply_overrides``; an unknown flag is an error (argparse lists the
choices with ``--help``). A few common fields also have short spellings (``--max-steps``,
``--out-dir``, ``--kernels``, ...); giving a short and a long spelling of the same field with
different values is an error, not a silent precedence.

Precedence of sources, each applied on top of the previous one: ``--preset`` (default: the
dataclass defaults), ``--config FILE`` (TOML or JSON), then the flags.
"""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
import textwrap

from cs336.config import PRESETS, SECTIONS, ConfigError, TrainConfig, apply_overrides, load_config, preset

# short flag -> (config key, value for a flag without argument or None when it takes one)
SHORTCUTS: dict[str, tuple[str, str | None]] = {
    "--out-dir": ("train.out_dir", None),
    "--max-steps": ("train.max_steps", None),
    "--batch-size": ("train.batch_size", None),
    "--seed": ("train.seed", None),
    "--device": ("train.device", None),
    "--compile": ("train.compile", "true"),
    "--wandb": ("train.wandb", "true"),
    "--profile": ("train.profile", "true"),
    "--kernels": ("model.kernels", None),
    "--train-text": ("data.train_text", None),
    "--valid-text": ("data.valid_text", None),
    "--dataset": ("data.dataset", None),
}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (read from its source)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def add_config_arguments(parser: argparse.ArgumentParser, *, shortcuts: bool = True) -> None:
    """Add --preset, --config, the short flags and one --section.field flag per config field."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="start from a named preset instead of the defaults")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="TOML or JSON file of [section] tables applied on top of the preset")
    if shortcuts:
        group = parser.add_argument_group("short flags")
        for flag, (key, const) in SHORTCUTS.items():
            if const is None:
                group.add_argument(flag, dest=f"short:{key}", metavar="VALUE", default=None,
                                   help=f"same as --{key}")
            else:
                group.add_argument(flag, dest=f"short:{key}", action="store_const", const=const,
                                   default=None, help=f"same as --{key}={const}")
    defaults = TrainConfig()
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} ({cls.__name__})")
        docs = field_docs(cls)
        for name, value in vars(getattr(defaults, section)).items():
            is_bool = isinstance(value, bool)
            group.add_argument(
                f"--{section}.{name}", dest=f"long:{section}.{name}", default=None,
                metavar="BOOL" if is_bool else "VALUE", nargs="?" if is_bool else None,
                const="true" if is_bool else None,
                help=f"{docs.get(name, '')} (default: {value!r})".strip())


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """``section.field=value`` strings from the parsed flags; conflicting spellings are errors."""
    chosen: dict[str, tuple[str, str]] = {}
    for dest, value in vars(args).items():
        if value is None or ":" not in dest:
            continue
        kind, key = dest.split(":", 1)
        flag = next((f for f, (k, _) in SHORTCUTS.items() if k == key), None) if kind == "short" else f"--{key}"
        if key in chosen and chosen[key][1] != value:
            raise ConfigError(f"{chosen[key][0]}={chosen[key][1]} conflicts with {flag}={value}; "
                              "give the field once")
        chosen[key] = (flag, value)
    return [f"{key}={value}" for key, (_, value) in chosen.items()]


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Resolve preset, config file and flags into one validated TrainConfig."""
    cfg = preset(args.preset) if args.preset else TrainConfig()
    if args.config:
        cfg = load_config(args.config, cfg)
    return apply_overrides(cfg, overrides_from_args(args))
