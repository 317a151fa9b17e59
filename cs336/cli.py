"""Command-line arguments generated from the config dataclasses: one path for every command.

``train``, ``profile``, ``accounting``, ``sweep`` and ``experiments run`` call ``add_config_arguments``
and ``config_from_args``: every field becomes ``--section.field=VALUE`` (a bare boolean flag means
true), parsed and type-checked by ``cs336.config_io.apply_overrides``; an unknown flag names the
closest valid ones. Short spellings (``--max-steps``, ``--out-dir``, ``--kernels``, ...) that disagree
with the long one are an error, not a precedence. Sources stack: ``--preset NAME`` (each command has
its default), ``--model NAME``, ``--config FILE`` (TOML or JSON), then the flags in order. Deviation
from plain argparse: ``run_cli`` wraps ``cs336.interrupt.run_cli`` and turns an ``OSError`` the user
can fix (``cs336.fileio.FIXES``: no space, permission, read-only, busy, missing path) into one line
naming the file and the fix, exit 2. Source: torchtitan's config manager (fields as flags).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import cast

from cs336.config import SECTIONS, ConfigError, TrainConfig, check_positive, kernel_backends
from cs336.config_io import apply_overrides, load_config
from cs336.presets import MODEL_PRESETS, PRESETS, model_preset, preset

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
    "--context-length": ("model.context_length", None),
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
    body = cast("ast.ClassDef", tree.body[0]).body  # the source of a class is one ClassDef
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def add_config_arguments(parser: argparse.ArgumentParser, *, default_preset: str = "default",
                         shortcuts: bool = True, config_aliases: Sequence[str] = (),
                         without: Sequence[str] = ()) -> None:
    """Add --preset, --model, --config (plus ``config_aliases``), the short flags (less those in
    ``without``, which the command spells itself) and one --section.field flag per config field;
    ``default_preset`` is the base without --preset."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help=f"start from a named run preset (default: {default_preset})")
    parser.set_defaults(default_preset=default_preset)
    parser.add_argument("--model", metavar="NAME", default=None, choices=list(MODEL_PRESETS),
                        help=f"replace the model section by a model preset: {', '.join(MODEL_PRESETS)}")
    parser.add_argument("--config", *config_aliases, metavar="FILE", default=None,
                        help="TOML or JSON file of [section] tables applied on top of the preset")
    if shortcuts:
        group = parser.add_argument_group("short flags")
        for flag, (key, const) in SHORTCUTS.items():
            if flag in without:
                continue
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
            doc = docs.get(name, "")
            if (section, name) == ("model", "kernels"):
                doc += f" Choices: {', '.join(kernel_backends())}."
            group.add_argument(
                f"--{section}.{name}", dest=f"long:{section}.{name}", default=None,
                metavar="BOOL" if is_bool else "VALUE", nargs="?" if is_bool else None,
                const="true" if is_bool else None,
                help=f"{doc} (default: {value!r})".strip())


class _DeprecatedAlias(argparse.Action):
    """An old spelling of a flag: stores into the new flag's dest and prints a one-line note."""

    def __init__(self, option_strings, dest, *, new: str, **kwargs) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"note: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str, **kwargs) -> None:
    """Accept ``old`` as a hidden alias of the already added flag ``new`` (same dest; ``kwargs``
    such as ``type=`` as for ``new``), with a deprecation note on use. One spelling per idea
    across the commands: ``--out-dir DIR`` for a directory a command writes, ``--out FILE`` for a
    file, ``--run DIR`` for a training run directory it reads."""
    action = next(a for a in parser._actions if new in a.option_strings)
    parser.add_argument(old, dest=action.dest, action=_DeprecatedAlias, new=new, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS, metavar=action.metavar, **kwargs)


def positive_int(text: str) -> int:
    """argparse ``type=`` for a command's own positive-integer option (``check_positive``)."""
    try:
        return check_positive("the value", int(text))
    except (ValueError, ConfigError):
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args`` whose error for unknown flags suggests the closest valid flags
    (``--d-model`` -> ``--model.d_model``)."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = _flags(parser)
        by_field = {f.split(".", 1)[1]: f for f in flags if "." in f}
        hints = []
        for arg in unknown:
            flag = arg.split("=", 1)[0]
            bare = flag.lstrip("-").replace("-", "_")
            close = [by_field[k] for k in difflib.get_close_matches(bare, by_field, n=2)]
            close += [f for f in difflib.get_close_matches(flag, flags, n=3) if f not in close]
            hints.append(f"{arg} (did you mean {' / '.join(close[:3])}?)" if close and flag.startswith("-") else arg)
        parser.error("unknown arguments: " + ", ".join(hints))
    return args


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    """Every option string of ``parser`` and of its subcommands (``experiments run --model.d_model``)."""
    flags: list[str] = []
    for action in parser._actions:
        flags += action.option_strings
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                flags += [f for f in _flags(sub) if f not in flags]
    return flags


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """``section.field=value`` strings from the parsed flags; conflicting spellings are errors."""
    chosen: dict[str, tuple[str | None, str]] = {}
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


def base_config(args: argparse.Namespace) -> TrainConfig:
    """The preset, with the model section replaced when --model names a model preset."""
    cfg = preset(args.preset or args.default_preset)
    if getattr(args, "model", None):
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(model_preset(args.model),
                                                                 kernels=cfg.model.kernels))
    return cfg


def config_from_args(args: argparse.Namespace, extra: Sequence[str] = ()) -> TrainConfig:
    """Resolve preset, model preset, config file, the flags and then ``extra`` overrides into
    one validated TrainConfig."""
    cfg = base_config(args)
    if args.config:
        cfg = load_config(args.config, cfg)
    return apply_overrides(cfg, [*overrides_from_args(args), *extra])


class UserError(Exception):
    """An error whose message is the whole story for the user (``run_cli`` prints it, exit 2)."""


def user_error_message(exc: BaseException) -> str | None:
    """One line for an exception the user caused and can fix, or None (a bug: keep the traceback).

    ``WriteError`` already names its file; any other ``OSError`` with an errno in
    ``cs336.fileio.FIXES`` is told as ``FILE: cause; fix``.
    """
    from cs336.fileio import FIXES, WriteError

    if isinstance(exc, WriteError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in FIXES:
        where = " -> ".join(os.fsdecode(f) for f in (exc.filename, exc.filename2) if f is not None)
        fix = FIXES[exc.errno]
        return f"{where}: {exc.strerror}; {fix}" if where else f"{exc.strerror}; {fix}"
    return None


def run_cli(body: Callable[[], object], *, user_errors: tuple[type[BaseException], ...] = (),
            on_interrupt: Callable[[], str] | None = None, is_main: bool | None = None,
            exit_codes: dict[type[BaseException], int] | None = None) -> None:
    """Run ``body()`` as a command: ``cs336.interrupt.run_cli`` with the same arguments, plus any
    user-fixable ``OSError`` (``user_error_message``) as one line and exit 2. A closed stdout
    (``... | head``) ends the command quietly."""
    from cs336.interrupt import run_cli as run_with_signals

    def guarded() -> None:
        try:
            body()
        except BrokenPipeError:
            _quiet_stdout()
        except (*user_errors, *(exit_codes or {})):  # noqa: B030 (a tuple of exception classes, unpacked)
            raise
        except Exception as exc:
            message = user_error_message(exc)
            if message is None:
                raise
            raise UserError(message) from None

    run_with_signals(guarded, user_errors=(*user_errors, UserError), on_interrupt=on_interrupt,
                     is_main=is_main, exit_codes=exit_codes)


def _quiet_stdout() -> None:
    """After EPIPE on stdout, point it at /dev/null so the interpreter's final flush is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
