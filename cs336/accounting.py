"""Resource accounting for a model config, printed as tables or JSON.

    python -m cs336.accounting --model gpt2-xl [--context-length 16384] [--batch-size 4] \
        [--model.d_model=2048 ...] [--device-memory 80GiB] [--hardware h100] [--mfu 0.5] \
        [--steps 400000] [--json]

The model and batch come from the same flags as ``python -m cs336.train`` (``cs336.cli``; the
default preset here is ``accounting``: the TinyStories model, one sequence; ``--model NAME``
picks a model preset, ``--context-length`` is ``--model.context_length``). Prints the trainable
parameters by tensor, forward matmul FLOPs by component with their fractions, training FLOPs
(3 x forward), AdamW training memory (fp32 parameters, gradients, m and v, and activations by
component for ``train.batch_size`` sequences of ``train.context_length`` tokens), the largest
batch that fits ``--device-memory`` (default: the ``--hardware`` table entry), and the time to
train ``--steps`` steps at ``--mfu`` of that hardware's dense BF16 peak. The conventions are those
of ``cs336.flops``. Then one rank's bytes (``cs336.memory``) under the run's own flags:
``--train.parallel``, ``--world-size``, ``--train.activation_checkpointing``, ``--train.autocast``,
``--kernels`` (what that provider stores for backward) and ``--train.grad_accum_steps``, and the
largest micro-batch per rank that fits the device memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re

from cs336 import flops, hardware
from cs336 import memory as rank_memory
from cs336.cli import add_config_arguments, config_from_args, parse_args, run_cli
from cs336.config import ConfigError, TrainConfig

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """``80GiB``, ``80GB``, ``8e10`` or a plain byte count -> bytes."""
    match = re.fullmatch(r"\s*((?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE]\+?[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(f"--device-memory {text!r} is not a size; write e.g. 80GiB, 80GB or "
                          f"85899345920 (units: {', '.join(u for u in _UNITS if u)})")
    scaled = float(match.group(1)) * _UNITS[unit]
    if not math.isfinite(scaled) or scaled >= 2**63:
        raise ConfigError(f"--device-memory {text!r} is too large (at most 2**63 bytes); write e.g. 80GiB")
    value = int(scaled)
    if value <= 0:
        raise ConfigError(f"--device-memory must be positive, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cs336.accounting", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    group = p.add_argument_group("accounting")
    choices = ", ".join([*hardware.DEVICES, *hardware.ALIASES])
    group.add_argument("--hardware", default=None, help=f"hardware for time and memory: {choices}")
    group.add_argument("--device-memory", default=None,
                       help="memory for the largest-batch answer, e.g. 80GiB (default: the --hardware entry)")
    group.add_argument("--mfu", type=float, default=0.5, help="model FLOPs utilization (default 0.5)")
    group.add_argument("--steps", type=int, default=None, help="steps to time (needs --hardware)")
    group.add_argument("--world-size", type=int, default=1,
                       help="data-parallel ranks for the per-rank figures (with --train.parallel)")
    group.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    add_config_arguments(p, default_preset="accounting")
    return p


def account(cfg: TrainConfig, args: argparse.Namespace) -> dict:
    """Every figure for ``cfg``'s model and batch (raises ConfigError / UnknownDeviceError)."""
    model, B, T = cfg.model, cfg.train.batch_size, cfg.context_length
    if not 0 < args.mfu <= 1:  # checked whether or not --steps uses it: a value that cannot be right
        raise ConfigError(f"--mfu must lie in (0, 1], got {args.mfu}; pass a fraction such as 0.4")
    spec = hardware.lookup(args.hardware) if args.hardware else None
    name = args.model or args.preset or args.default_preset
    out: dict = {"model": name, "config": dataclasses.asdict(model), "batch_size": B, "seq_len": T}
    params = flops.param_counts(model)
    fwd = flops.forward_flops(model, B, T)
    memory = flops.training_memory(model, B, T)
    out.update(params=sum(params.values()), params_by_component=params,
               forward_flops=sum(fwd.values()), forward_flops_by_component=fwd,
               training_flops=flops.training_flops(model, B, T),
               memory_bytes=sum(memory.values()), memory_by_component=memory)
    mem_limit = parse_bytes(args.device_memory) if args.device_memory else (spec.memory if spec else None)
    out.update(_per_rank(cfg, args, spec))
    if mem_limit is not None:
        out["device_memory_bytes"] = mem_limit
        out["max_batch_size"] = flops.max_batch_size(model, mem_limit, T)
        out["max_micro_batch_per_rank"] = rank_memory.max_micro_batch(model, mem_limit, T, **out["per_rank_setup"])
    if args.steps is not None:
        if spec is None:
            raise ConfigError("--steps needs --hardware to know the peak FLOP/s; valid choices: "
                              f"{', '.join([*hardware.DEVICES, *hardware.ALIASES])}")
        out.update(device=spec.key, peak_flops=spec.bf16_flops, mfu=args.mfu, steps=args.steps,
                   training_time_s=flops.training_time_seconds(model, B, args.steps, spec.bf16_flops,
                                                               args.mfu, T))
    return out


def _per_rank(cfg: TrainConfig, args: argparse.Namespace, spec) -> dict:
    """Per-rank bytes (``cs336.memory``) for the run's provider, parallelism, checkpointing and
    precision; ``auto`` is triton with --hardware (a GPU), else what this machine resolves."""
    from cs336 import ops

    world = args.world_size
    if world < 1:
        raise ConfigError(f"--world-size must be >= 1, got {world}")
    t = cfg.train
    rows = t.batch_size // world
    if t.batch_size % world or rows % t.grad_accum_steps:
        raise ConfigError(f"train.batch_size={t.batch_size} does not split into --world-size={world} ranks x "
                          f"train.grad_accum_steps={t.grad_accum_steps} equal micro-batches; pick a multiple")
    kernels = cfg.model.kernels
    provider = kernels if kernels != "auto" else ("triton" if spec is not None else ops.resolve_backend("auto"))
    setup = dict(provider=provider, autocast=t.autocast, checkpointing=t.activation_checkpointing,
                 parallel=t.parallel, world_size=world)
    micro = rows // t.grad_accum_steps
    per_rank = rank_memory.per_rank_memory(cfg.model, micro, cfg.context_length, **setup)
    return {"per_rank_setup": setup, "micro_batch_per_rank": micro, "per_rank_bytes": sum(per_rank.values()),
            "per_rank_by_component": per_rank}


def _table(title: str, rows: dict[str, int], unit: str, base: int = 1000) -> list[str]:
    total = sum(rows.values())
    width = max(len(k) for k in rows) + 2
    lines = [title, f"  {'component':<{width}}{'value':>14}{'share':>9}"]
    for name, value in rows.items():
        lines.append(f"  {name:<{width}}{flops.humanize(value, unit, base):>14}"
                     f"{100 * value / total:>8.2f}%")
    lines.append(f"  {'total':<{width}}{flops.humanize(total, unit, base):>14}  ({total:,})")
    return lines


def render(out: dict) -> str:
    cfg = out["config"]
    lines = [f"model {out['model']}: d_model={cfg['d_model']} layers={cfg['num_layers']} "
             f"heads={cfg['num_heads']} d_ff={cfg['d_ff']} vocab={cfg['vocab_size']} "
             f"ffn={cfg['ffn_type']}; batch {out['batch_size']} x {out['seq_len']} tokens", ""]
    title = "trainable parameters (layers.* summed over layers)"
    if cfg.get("tie_embeddings"):
        title += "; the LM head is the embedding, counted once"
    lines += _table(title, out["params_by_component"], "")
    lines += [""] + _table("forward matmul FLOPs (2mnp)", out["forward_flops_by_component"], "FLOP")
    lines += ["", f"training FLOPs per step (forward + 2x backward): "
                  f"{flops.humanize(out['training_flops'], 'FLOP')} ({out['training_flops']:,})", ""]
    lines += _table("AdamW training memory (fp32)", out["memory_by_component"], "B", 1024)
    setup = out["per_rank_setup"]
    lines += [""] + _table(f"per-rank training memory ({setup['parallel']} x {setup['world_size']} ranks, "
                           f"provider {setup['provider']}, autocast {setup['autocast']}, checkpointing "
                           f"{setup['checkpointing']}; micro-batch {out['micro_batch_per_rank']})",
                           out["per_rank_by_component"], "B", 1024)
    if "max_batch_size" in out:
        lines += ["", f"largest batch fitting {flops.humanize(out['device_memory_bytes'], 'B', 1024)}: "
                      f"{out['max_batch_size']} (handout list, fp32); per rank as configured: micro-batch "
                      f"{out['max_micro_batch_per_rank']}"]
    if "training_time_s" in out:
        seconds = out["training_time_s"]
        lines += ["", f"{out['steps']:,} steps on {out['device']} at MFU {out['mfu']:g} "
                      f"(peak {flops.humanize(out['peak_flops'], 'FLOP/s')}): {seconds:,.0f} s = "
                      f"{seconds / 3600:,.1f} h = {seconds / 86400:,.2f} days"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(build_parser(), argv)

    def body() -> None:
        out = account(config_from_args(args), args)
        print(json.dumps(out, indent=2) if args.json else render(out))

    run_cli(body, user_errors=(ConfigError, hardware.UnknownDeviceError),
            on_interrupt=lambda: "nothing was written")


if __name__ == "__main__":
    main()
