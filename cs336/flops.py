"""Analytic resource accounting for the Transformer LM: parameters, FLOPs, memory and time.

Every figure is computed from a ``ModelConfig`` as an ordered dict of components that sum to the total.
Conventions (CS336 handout section 3.6 and problem ``adamwAccounting``): parameters are the trainable
tensors of ``TransformerLM``, keyed like its state dict with the layer index as ``*``. Forward FLOPs
count matrix multiplies only (``2 m n p``): Q/K/V, ``Q K^T`` and ``softmax(.) V`` over the full T x T
scores (causal masking not subtracted), the output projection, W1/W3/W2 (W1/W2 for ``silu``), the LM
head; norms, RoPE, softmax, SiLU and the loss are O(B T d) and left out, exactly the terms
``FlopCounterMode`` counts (mm/bmm). Training = 3 x forward (backward = 2 x forward). AdamW memory:
parameters, gradients, m and v at ``param_bytes`` each; activations are the outputs the handout lists
(both RMSNorms, Q/K/V, ``Q K^T``, softmax, weighted sum, output projection, W1, SiLU, W3, W2, final norm,
logits, the loss's softmax) at ``act_bytes`` each. Deviation: the gated FFN also counts the product
``silu(W1 x) * W3 x``, the input of W2; residual sums, the embedding output and allocator slack are not
counted. ``op_cost`` gives per-op FLOPs and the minimal HBM bytes a fused kernel moves, for the benchmarks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cs336.config import ConfigError, ModelConfig
from cs336.config import check_positive as _positive


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Trainable parameters by tensor (summed over layers), in state-dict order. A tied model
    (``tie_embeddings``) has one matrix for the embedding and the head: it is counted once, under
    ``token_embeddings.weight``, the name ``named_parameters`` gives it."""
    d, f, V, L = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.num_layers
    norm = 0 if cfg.remove_rmsnorm else d
    head_norm = d // cfg.num_heads if cfg.qk_norm else 0
    per_layer = {
        "attn.q_proj.weight": d * d,
        "attn.k_proj.weight": d * d,
        "attn.v_proj.weight": d * d,
        "attn.output_proj.weight": d * d,
        "attn.q_norm.weight": head_norm,
        "attn.k_norm.weight": head_norm,
        "ln1.weight": norm,
        "ffn.w1.weight": f * d,
        "ffn.w2.weight": d * f,
        "ffn.w3.weight": f * d if cfg.ffn_type == "swiglu" else 0,
        "ln2.weight": norm,
    }
    counts = {"token_embeddings.weight": V * d}
    counts.update({f"layers.*.{k}": L * v for k, v in per_layer.items() if v})
    if norm:
        counts["ln_final.weight"] = norm
    if not cfg.tie_embeddings:
        counts["lm_head.weight"] = V * d
    return counts


def num_params(cfg: ModelConfig) -> int:
    return sum(param_counts(cfg).values())


def forward_flops(cfg: ModelConfig, batch_size: int = 1, seq_len: int | None = None) -> dict[str, int]:
    """Forward matmul FLOPs by component for ``batch_size`` sequences of ``seq_len`` tokens
    (default: the context length), summed over layers."""
    B = _positive("batch_size", batch_size)
    T = _positive("seq_len", cfg.context_length if seq_len is None else seq_len)
    d, f, V, L = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.num_layers
    tokens = B * T
    flops = {
        "attn.qkv_proj": L * 3 * 2 * tokens * d * d,
        # Per head (T x d_head) @ (d_head x T), summed over heads: d_head * heads = d_model.
        "attn.qk": L * 2 * B * T * T * d,
        # Per head (T x T) @ (T x d_head), summed over heads.
        "attn.av": L * 2 * B * T * T * d,
        "attn.output_proj": L * 2 * tokens * d * d,
        "ffn.w1": L * 2 * tokens * d * f,
    }
    if cfg.ffn_type == "swiglu":
        flops["ffn.w3"] = L * 2 * tokens * d * f
    flops["ffn.w2"] = L * 2 * tokens * f * d
    flops["lm_head"] = 2 * tokens * d * V
    return flops


def total_forward_flops(cfg: ModelConfig, batch_size: int = 1, seq_len: int | None = None) -> int:
    return sum(forward_flops(cfg, batch_size, seq_len).values())


def training_flops(cfg: ModelConfig, batch_size: int = 1, seq_len: int | None = None) -> int:
    """FLOPs of one optimizer step's forward and backward (3 x forward; the AdamW update is
    O(params) and left out)."""
    return 3 * total_forward_flops(cfg, batch_size, seq_len)


def activation_counts(cfg: ModelConfig, batch_size: int = 1, seq_len: int | None = None) -> dict[str, int]:
    """Saved activation elements by component (see the module docstring for the list)."""
    B = _positive("batch_size", batch_size)
    T = _positive("seq_len", cfg.context_length if seq_len is None else seq_len)
    d, f, V, L, H = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.num_layers, cfg.num_heads
    btd, btf = B * T * d, B * T * f
    norm = 0 if cfg.remove_rmsnorm else btd
    swiglu = cfg.ffn_type == "swiglu"
    per_layer = {
        "ln1": norm,
        "attn.qkv": 3 * btd,
        "attn.qk_scores": B * H * T * T,
        "attn.softmax": B * H * T * T,
        "attn.weighted_sum": btd,
        "attn.output_proj": btd,
        "ln2": norm,
        "ffn.w1": btf,
        "ffn.silu": btf,
        "ffn.w3": btf if swiglu else 0,
        "ffn.gate_product": btf if swiglu else 0,
        "ffn.w2": btd,
    }
    counts = {f"layers.*.{k}": L * v for k, v in per_layer.items() if v}
    if norm:
        counts["ln_final"] = norm
    counts["lm_head_logits"] = B * T * V
    counts["cross_entropy_softmax"] = B * T * V
    return counts


def training_memory(cfg: ModelConfig, batch_size: int = 1, seq_len: int | None = None, *,
                    param_bytes: int = 4, act_bytes: int = 4) -> dict[str, int]:
    """AdamW training memory in bytes: parameters, gradients, m, v, then activations by component
    (keys ``activations.<component>``)."""
    p = num_params(cfg) * param_bytes
    memory = {"parameters": p, "gradients": p, "adamw.m": p, "adamw.v": p}
    for name, count in activation_counts(cfg, batch_size, seq_len).items():
        memory[f"activations.{name}"] = count * act_bytes
    return memory


def max_batch_size(cfg: ModelConfig, memory_bytes: int, seq_len: int | None = None, *,
                   param_bytes: int = 4, act_bytes: int = 4) -> int:
    """Largest batch whose ``training_memory`` fits in ``memory_bytes`` (0 if none does).

    Memory is affine in the batch size: fixed (parameters, gradients, m, v) plus per-sequence
    activations, so the answer is floor((memory - fixed) / per_sequence).
    """
    _positive("memory_bytes", memory_bytes)
    one = training_memory(cfg, 1, seq_len, param_bytes=param_bytes, act_bytes=act_bytes)
    fixed = sum(v for k, v in one.items() if not k.startswith("activations."))
    per_sequence = sum(one.values()) - fixed
    return max(0, (memory_bytes - fixed) // per_sequence)


def training_time_seconds(cfg: ModelConfig, batch_size: int, steps: int, peak_flops: float,
                          mfu: float, seq_len: int | None = None) -> float:
    """Seconds for ``steps`` optimizer steps at model-FLOPs utilization ``mfu`` of ``peak_flops``."""
    _positive("steps", steps)
    if not 0 < mfu <= 1:
        raise ConfigError(f"mfu must lie in (0, 1], got {mfu!r}")
    _positive("peak_flops", peak_flops, integer=False)
    return steps * training_flops(cfg, batch_size, seq_len) / (mfu * peak_flops)


def fractions(parts: dict[str, int]) -> dict[str, float]:
    total = sum(parts.values())
    return {k: (v / total if total else 0.0) for k, v in parts.items()}


# ---------------------------------------------------------------------------------------------
# Op-level costs for the benchmark suite.
# ---------------------------------------------------------------------------------------------

PASSES = ("fwd", "bwd", "fwd+bwd")

# Elementwise FLOPs per element, counted from the formulas (an exp, sqrt or reciprocal counts 1):
# rms_norm fwd: x*x, row-sum, * inv_rms, * weight = 4. bwd: w*dy, * x_hat, row-sum, x_hat * c,
#   subtract, * inv_rms (dx) plus dy * x_hat and the column sum (dw) = 8.
# swiglu fwd: sigmoid (neg, exp, add, reciprocal = 4), * a, * b = 6. bwd: sigmoid 4,
#   s * (1 - s) * a + s = 4, * b, * dc (da) plus silu * dc (db, silu = 1 more) = 12.
# cross_entropy fwd: max, subtract, exp, row-sum = 4 per logit. bwd: subtract, exp, divide by the
#   sum, scale by 1/M = 4 per logit (the one-hot subtraction is per row).
# adamw: m (3), v (4), sqrt, + eps, divide, * step size, p -= (5), decay p * lr * wd and p -= (2)
#   = 14 per parameter.
_ELEMENTWISE = {
    "rms_norm": (4, 8),
    "swiglu": (6, 12),
    "cross_entropy": (4, 4),
}


@dataclass(frozen=True)
class OpCost:
    flops: int
    """Analytic FLOPs (matmul 2mnp plus the elementwise counts above)."""
    matmul_flops: int
    """The matmul part alone: what FlopCounterMode measures."""
    bytes: int
    """Minimal HBM traffic: every input read once, every output written once."""


def _pass_sum(fwd: tuple[int, int, int], bwd: tuple[int, int, int], which: str) -> OpCost:
    if which not in PASSES:
        raise ConfigError(f"pass {which!r}; valid choices: {', '.join(PASSES)}")
    parts = {"fwd": [fwd], "bwd": [bwd], "fwd+bwd": [fwd, bwd]}[which]
    return OpCost(*(sum(p[i] for p in parts) for i in range(3)))


def op_cost(op: str, which: str, *, M: int, N: int, K: int = 0, element_bytes: int = 4) -> OpCost:
    """Cost of one benchmarked op.

    rms_norm / swiglu: M rows of width N. cross_entropy: M rows of N logits (int64 targets).
    linear_cross_entropy: M rows of width K (hidden) against an (N x K) weight, N = vocab.
    adamw: one step over M parameters (fp32 p, g, m, v; N unused).
    """
    es, t = element_bytes, 8  # t: bytes per int64 target
    if op in ("rms_norm", "swiglu", "cross_entropy"):
        f_fwd, f_bwd = (n * M * N for n in _ELEMENTWISE[op])
        if op == "rms_norm":  # fwd: x, w -> y. bwd: x, w, dy -> dx, dw.
            b_fwd, b_bwd = (2 * M * N + N) * es, (3 * M * N + 2 * N) * es
        elif op == "swiglu":  # fwd: a, b -> c. bwd: a, b, dc -> da, db.
            b_fwd, b_bwd = 3 * M * N * es, 5 * M * N * es
        else:  # fwd: logits, targets -> loss. bwd: logits, targets -> dlogits.
            b_fwd, b_bwd = M * N * es + M * t, 2 * M * N * es + M * t
        return _pass_sum((f_fwd, 0, b_fwd), (f_bwd, 0, b_bwd), which)
    if op == "linear_cross_entropy":
        _positive("K", K)
        mm = 2 * M * K * N
        ce_fwd, ce_bwd = (n * M * N for n in _ELEMENTWISE["cross_entropy"])
        # fwd: h, W, targets -> loss. bwd: h, W, targets -> dh, dW (logits never stored).
        io = (M * K + N * K) * es + M * t
        return _pass_sum((mm + ce_fwd, mm, io), (2 * mm + ce_bwd, 2 * mm, io + (M * K + N * K) * es), which)
    if op == "adamw":
        return OpCost(14 * M, 0, 7 * M * 4)  # reads p, g, m, v; writes p, m, v
    raise ConfigError(f"unknown op {op!r}; valid choices: rms_norm, swiglu, cross_entropy, "
                      "linear_cross_entropy, adamw")


def humanize(value: float, unit: str = "", base: int = 1000) -> str:
    """3 significant digits with an SI (base 1000) or binary (base 1024) prefix."""
    prefixes = ["", "K", "M", "G", "T", "P", "E"]
    if base == 1024:
        prefixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
    index = 0 if value == 0 else min(len(prefixes) - 1, max(0, int(math.log(abs(value), base))))
    return f"{value / base ** index:.3g} {prefixes[index]}{unit}".rstrip()
