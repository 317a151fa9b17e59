"""The shapes ``python -m kernels.gpu_check`` compiles each kernel family at (its cases).

A case is a label and a thunk that calls a family's real launchers on ``meta`` tensors; the gate
records the launches the thunk makes (``kernels.gpu_check.capture``) and compiles each distinct
one for every target. Realistic shapes: d_model 512..16384 (and two wider rows, to reach every
column-loop branch), d_ff 4 x d_model and TinyStories' 1344, vocabularies 10000 / 32000 / 50257 /
131072, a one-tensor and a one-scalar AdamW group plus the parameter lists the caller passes
(``PARAM_GROUPS``: the model presets' lists, from ``bench/gpu_shapes.py``). ``full=False`` is the CI
subset: every kernel, dtype, constexpr branch and int == 1 specialization, at few shapes.

Adding a kernel family: one function decorated ``@case("attention")`` yielding
``Case(label, thunk)``, each thunk calling the family's launchers on ``_meta`` tensors through
``launcher`` (for a ``triton_op``, whose fake implementation would otherwise run on meta tensors).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import torch


@dataclasses.dataclass(frozen=True)
class Case:
    label: str  # shape and dtypes, e.g. "d_model=16384 rows=8192 bf16"
    run: Callable[[], object]  # calls the launchers on meta tensors
    realistic: bool = True  # a spill here fails the gate


CASES: dict[str, Callable[[bool], Iterator[Case]]] = {}


def case(name: str):
    """Register ``fn(full) -> Iterator[Case]`` as the cases of kernel family ``name``."""
    def register(fn):
        CASES[name] = fn
        return fn
    return register


def launcher(op):
    """The Python function behind a ``triton_op`` / ``custom_op`` (on meta tensors the op itself
    would run its fake implementation and launch nothing)."""
    return getattr(op, "_init_fn", op)



DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _meta(shape, dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


@case("rms_norm")
def rms_norm_cases(full: bool) -> Iterator[Case]:
    from kernels import rms_norm as k

    # Widths: every branch (one block and column loop, forward and backward) and, in full, the
    # model widths of d_model 512..16384 plus two wider rows. Rows: one (decoding: M and
    # rows_per_program are the constant 1), fewer than two per SM (rows_per_program == 1), and
    # training batches.
    if full:
        shapes = [(M, N) for N in (512, 768, 1024, 1280, 1600, 2048, 4096, 5120, 8192, 12288, 16384, 32768, 65536)
                  for M in (1, 200, 1000, 8192, 65536)]
    else:
        shapes = [(1, 768), (8192, 768), (8192, 16384), (8192, 32768)]
    for M, N in shapes:
        for name, dtype in DTYPES.items():
            for w_dtype in (dtype, torch.float32) if full and dtype != torch.float32 else (dtype,):
                def run(M=M, N=N, dtype=dtype, w_dtype=w_dtype):
                    x, w = _meta((M, N), dtype), _meta((N,), w_dtype)
                    y, rstd = launcher(k.rms_norm_fwd)(x, w, 1e-5)
                    launcher(k.rms_norm_bwd)(torch.empty_like(y), x, w, rstd)
                w_name = "" if w_dtype == dtype else " weight fp32"
                yield Case(f"d_model={N} rows={M} {name}{w_name}", run)


@case("swiglu")
def swiglu_cases(full: bool) -> Iterator[Case]:
    from kernels import swiglu as k

    shapes = [(256 * 32, 1344)] + [(8192, 4 * d) for d in ((768, 1600, 4096, 16384) if full else (768,))]
    for M, d_ff in shapes + ([(1, 1344)] if full else []):
        for name, dtype in DTYPES.items():
            def run(M=M, d_ff=d_ff, dtype=dtype):
                a = _meta((M, d_ff), dtype)
                launcher(k.swiglu_fwd)(a, a)
                launcher(k.swiglu_bwd)(a, a, a)
            yield Case(f"tokens={M} d_ff={d_ff} {name}", run)


@case("cross_entropy")
def cross_entropy_cases(full: bool) -> Iterator[Case]:
    from kernels import cross_entropy as k

    vocabs = (10000, 32000, 50257, 131072) if full else (50257,)
    for V in vocabs:
        for name, dtype in DTYPES.items():
            def run(V=V, dtype=dtype, M=4096, C=768):
                logits, targets = _meta((M, V), dtype), _meta((M,), torch.int64)
                loss, row_max, logsum, n_valid = launcher(k.cross_entropy_fwd)(logits, targets, -100)
                launcher(k.cross_entropy_bwd)(loss, logits, targets, row_max, logsum, n_valid, -100)
                h, w = _meta((M, C), dtype), _meta((V, C), dtype)
                rows = k.default_chunk_rows(M, V, C)
                launcher(k.linear_cross_entropy_fwd)(h, w, targets, -100, rows, True)
            yield Case(f"vocab={V} tokens=4096 {name}", run)
        for name, dtype in DTYPES.items():
            # The recipe's constexpr branches: soft-cap, z-loss, both (forward, backward, fused).
            for softcap, z_loss in ((30.0, 0.0), (0.0, 1e-4), (30.0, 1e-4)):
                def run_recipe(V=V, dtype=dtype, softcap=softcap, z_loss=z_loss, M=4096, C=768):
                    logits, targets = _meta((M, V), dtype), _meta((M,), torch.int64)
                    loss, row_max, logsum, n_valid = launcher(k.cross_entropy_fwd)(logits, targets, -100,
                                                                                   softcap, z_loss)
                    launcher(k.cross_entropy_bwd)(loss, logits, targets, row_max, logsum, n_valid, -100,
                                                  softcap, z_loss)
                    h, w = _meta((M, C), dtype), _meta((V, C), dtype)
                    rows = k.default_chunk_rows(M, V, C)
                    launcher(k.linear_cross_entropy_fwd)(h, w, targets, -100, rows, True, softcap, z_loss)
                yield Case(f"vocab={V} tokens=4096 {name} softcap={softcap:g} z_loss={z_loss:g}", run_recipe)


# Parameter lists the AdamW cases compile, label -> shapes. The built-in two are the int == 1
# cases; a caller adds the models' lists (``python -m kernels.gpu_check --param-shapes FILE``,
# written by ``bench/gpu_shapes.py`` from the model presets): kernels/ knows no model.
PARAM_GROUPS: dict[str, list[tuple[int, ...]]] = {"one tensor (768, 768)": [(768, 768)], "one scalar": [()]}


def add_param_groups(groups: dict[str, list]) -> None:
    """Add ``{label: [shape, ...]}`` parameter lists to the AdamW cases (shapes as lists or tuples)."""
    for label, shapes in groups.items():
        PARAM_GROUPS[f"{label} ({len(shapes)} tensors)"] = [tuple(int(n) for n in s) for s in shapes]


@case("adamw")
def adamw_cases(full: bool) -> Iterator[Case]:
    from kernels import adamw as k

    # (param, grad, exp_avg, exp_avg_sq) storage dtypes the optimizer produces or accepts.
    combos = {"fp32": ("fp32",) * 4, "bf16": ("bf16",) * 4, "fp16": ("fp16",) * 4,
              "bf16 p/fp32 state": ("bf16", "bf16", "fp32", "fp32"),
              "fp16 p/fp32 state": ("fp16", "fp16", "fp32", "fp32")}
    for label, group in PARAM_GROUPS.items():
        for combo, dts in combos.items():
            def run(group=group, dts=dts):
                quads = [[_meta(s, DTYPES[d]) for s in group] for d in dts]
                launcher(k._adamw_group_)(*quads, 1e-3, 0.9, 0.95, 1e-8, 1e-4)
            yield Case(f"{label} {combo}", run)


@case("attention")
def attention_cases(full: bool) -> Iterator[Case]:
    from kernels import attention as k

    # Head dims 32/64/128, causal (training, prefill) and not; sequence lengths: one tile-tail
    # length in CI, in full the model lengths up to the CS336 leaderboard's 16384. q, k, v as the
    # model passes them: (B, H, T, d) views of (B, T, H*d) projections (row stride H*d). Decoding
    # with a KV cache: one query (T_q == 1, an int-1 constant) over the cached keys, not causal.
    heads = 16
    if full:
        grid = [(d, T, causal) for d in (32, 64, 128) for T in (256, 1024, 4096, 16384) for causal in (True, False)]
        decode = [(d, 16384) for d in (32, 64, 128)]
    else:
        # CI: both tile classes of attention_config (d <= 64, d = 128), causal and not, a length
        # that is not a multiple of 16, and the one-query decode specialization.
        grid = [(64, 1000, True), (128, 1000, False)]
        decode = [(64, 1000)]
    for name, dtype in DTYPES.items():
        for d, T, causal in grid:
            def run(T=T, d=d, dtype=dtype, causal=causal):
                q = _meta((1, T, heads, d), dtype).transpose(1, 2)  # (1, H, T, d)
                o, lse = launcher(k.flash_attention_fwd)(q, q, q, causal)
                launcher(k.flash_attention_bwd)(o, q, q, q, o, lse, causal)
            yield Case(f"head_dim={d} T={T} {'causal' if causal else 'full'} {name}", run)
        for d, T_k in decode:
            def run_decode(d=d, dtype=dtype, T_k=T_k):
                q = _meta((4, 1, heads, d), dtype).transpose(1, 2)  # (4, H, 1, d)
                kv = _meta((4, heads, T_k, d), dtype)  # the cache, (B, H, ctx, d)
                launcher(k.flash_attention_fwd)(q, kv, kv, False)
            yield Case(f"head_dim={d} decode T_q=1 T_k={T_k} {name}", run_decode)
