"""Per-rank training memory: what each provider stores for backward, sharding, checkpointing.

``per_rank_memory`` splits one rank's bytes into parameters, gradients and AdamW m/v (fp32, whole
under DDP, this rank's dim-0 shards under FSDP2: ``ceil(rows / ranks)`` rows per rank, the last
ranks fewer), the RoPE tables (``rope_table_bytes``), the parameters FSDP gathers (the largest
unit, twice for the prefetch, in bf16 under the bf16 policy), the bf16 weight copies autocast
keeps for backward, and the activations saved for backward of one micro-batch.
``saved_activation_bytes`` is that last part alone; tests hold it to ``measure_saved_bytes``
(``torch.autograd.graph.saved_tensors_hooks``) within 10%.

Deviation from ``cs336.flops.training_memory`` (the handout's list of operation outputs): the
tensors counted here are those autograd really keeps, per provider (``STORED``, counted on the
default block: pre-norm, SwiGLU, RoPE). The torch reference keeps the T x T scores and
probabilities (three B x H x T x T tensors per layer) and the logits three times; native SDPA and
the Triton FlashAttention keep O and the logsumexp (B x H x T), and the Triton fused LM head +
loss keeps no logits at all. Under checkpointing a recomputed block keeps only its input (the
fp32 residual stream), and backward needs one block's activations at a time on top
(``activations.recompute``). Triton under bf16 cannot run on the CPU (its counts are the fp32
ones with bf16 matmul outputs, an estimate).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, cast

from cs336.config import ConfigError, ModelConfig
from cs336.flops import param_counts

if TYPE_CHECKING:
    import torch

    from cs336.model import TransformerLM

# Elements kept for backward, by shape unit and kind ("a": the activation dtype, bf16 under
# autocast; "f": always fp32; "b": bool; "i": int64), per layer and once per model. Units: BTd =
# B*T*d_model, BTf = B*T*d_ff, BHTT = B*heads*T*T, BHT = B*heads*T, BT = B*T, TT = T*T, BTV = B*T*vocab,
# dV = d_model*vocab.
# fp32 runs store every "a" tensor in fp32. Read off saved_tensors_hooks on the real model.
STORED = {
    ("torch", "none"): {"layer": {("BTd", "f"): 10, ("BTf", "f"): 5, ("BHTT", "f"): 3, ("BHT", "f"): 2,
                                  ("BT", "f"): 2, ("TT", "b"): 1},
                        "model": {("BTd", "f"): 3, ("BTV", "f"): 3, ("BT", "f"): 3, ("BT", "i"): 2,
                                  ("BT", "b"): 1}},
    ("torch", "bf16"): {"layer": {("BTd", "a"): 9, ("BTd", "f"): 4, ("BTf", "a"): 5, ("BHTT", "a"): 1,
                                  ("BHTT", "f"): 2, ("BHT", "f"): 2, ("BT", "f"): 2, ("TT", "b"): 1},
                        "model": {("BTd", "a"): 1, ("BTd", "f"): 2, ("BTV", "f"): 3, ("BT", "f"): 3,
                                  ("BT", "i"): 2, ("BT", "b"): 1}},
    ("native", "none"): {"layer": {("BTd", "f"): 10, ("BTf", "f"): 4, ("BHT", "f"): 1, ("BT", "f"): 2},
                         "model": {("BTd", "f"): 3, ("BTV", "f"): 1, ("BT", "f"): 1, ("BT", "i"): 2}},
    ("native", "bf16"): {"layer": {("BTd", "a"): 9, ("BTd", "f"): 4, ("BTf", "a"): 1, ("BTf", "f"): 3,
                                   ("BHT", "f"): 1, ("BT", "f"): 2},
                         "model": {("BTd", "a"): 1, ("BTd", "f"): 2, ("BTV", "f"): 1, ("BT", "f"): 1,
                                   ("BT", "i"): 2}},
    # The fused LM head + loss computes grad_W in the forward: one fp32 (vocab x d_model) tensor.
    ("triton", "none"): {"layer": {("BTd", "f"): 8, ("BTf", "f"): 3, ("BHT", "f"): 1, ("BT", "f"): 2},
                         "model": {("BTd", "f"): 2, ("BT", "f"): 1, ("BT", "i"): 1, ("dV", "f"): 1}},
    # Under autocast the Triton norms keep fp32 inputs and the fused head's bf16 grad_W is the
    # size of the head's weight copy (counted in ``autocast.weight_copies``).
    ("triton", "bf16"): {"layer": {("BTd", "a"): 9, ("BTd", "f"): 2, ("BTf", "a"): 3, ("BHT", "f"): 1,
                                   ("BT", "f"): 2},
                         "model": {("BTd", "a"): 1, ("BTd", "f"): 1, ("BT", "f"): 1, ("BT", "i"): 1}},
}
_BYTES = {"f": 4, "b": 1, "i": 8}
PROVIDERS = ("torch", "native", "triton")


def stored_by_provider(provider: str, autocast: str) -> dict:
    if (provider, autocast) not in STORED:
        raise ConfigError(f"no activation table for provider {provider!r} under autocast {autocast!r}; "
                          f"providers: {', '.join(PROVIDERS)} (resolve 'auto' with cs336.ops.resolve_backend)")
    return STORED[(provider, autocast)]


def _unit(cfg: ModelConfig, B: int, T: int) -> dict[str, int]:
    d, f, V, H = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.num_heads
    return {"BTd": B * T * d, "BTf": B * T * f, "BHTT": B * H * T * T, "BHT": B * H * T, "BT": B * T,
            "TT": T * T, "BTV": B * T * V, "dV": d * V}


def _bytes(table: dict, units: dict[str, int], autocast: str) -> int:
    act = 2 if autocast == "bf16" else 4
    return sum(n * units[u] * (act if kind == "a" else _BYTES[kind]) for (u, kind), n in table.items())


def checkpointed_count(num_layers: int, checkpointing: str) -> int:
    from cs336.parallel import checkpointed_blocks

    return len(checkpointed_blocks(num_layers, checkpointing))


def saved_activation_bytes(cfg: ModelConfig, micro_batch: int, seq_len: int, *, provider: str,
                           autocast: str = "none", checkpointing: str = "none") -> dict[str, int]:
    """Bytes kept for backward at the end of one micro-batch's forward, by part."""
    table = stored_by_provider(provider, autocast)
    units = _unit(cfg, micro_batch, seq_len)
    L = cfg.num_layers
    ck = checkpointed_count(L, checkpointing)
    per_layer = _bytes(table["layer"], units, autocast)
    out = {"activations.blocks": (L - ck) * per_layer,
           "activations.checkpointed_inputs": ck * units["BTd"] * 4,  # the fp32 residual stream
           "activations.embedding_head_loss": _bytes(table["model"], units, autocast)}
    if autocast == "bf16":  # autocast's bf16 copies of the matmul weights, kept by the kept blocks
        d, f = cfg.d_model, cfg.d_ff
        block = 4 * d * d + (3 if cfg.ffn_type == "swiglu" else 2) * d * f
        out["autocast.weight_copies"] = 2 * ((L - ck) * block + cfg.vocab_size * d)
    return out


def _rows(rows: int, world: int, rank: int) -> int:
    chunk = math.ceil(rows / world)
    return max(0, min(chunk, rows - rank * chunk))


def shard_elements(cfg: ModelConfig, world_size: int = 1, rank: int = 0) -> int:
    """Parameter elements rank ``rank`` holds: all under DDP (world 1), its dim-0 rows under FSDP."""
    if world_size == 1:
        return sum(param_counts(cfg).values())
    d, f, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    shapes = cast("list[tuple[int, ...]]", [(V, d), (V, d)]) + ([(d,)] if not cfg.remove_rmsnorm else [])
    block = (cast("list[tuple[int, ...]]", [(d, d)] * 4) + [(f, d), (d, f)]
             + ([(f, d)] if cfg.ffn_type == "swiglu" else []))
    block += [] if cfg.remove_rmsnorm else [(d,), (d,)]
    shapes += block * cfg.num_layers
    return sum(_rows(s[0], world_size, rank) * math.prod(s[1:]) for s in shapes)


def rope_table_bytes(cfg: ModelConfig) -> int:
    """The model's one RoPE module: its fp32 cos and sin tables (``model.context_length`` rows of
    d_head, whatever the training context) and the float64 angles they are computed from at build
    time. Negligible at usual sizes (0.75 MB for gpt2-xl), but it is what a huge
    ``--model.context_length`` with a short ``--train.context_length`` allocates."""
    return (2 * 4 + 4) * cfg.context_length * cfg.d_head


def per_rank_memory(cfg: ModelConfig, micro_batch: int, seq_len: int, *, provider: str, autocast: str = "none",
                    checkpointing: str = "none", parallel: str = "ddp", world_size: int = 1,
                    rank: int = 0) -> dict[str, int]:
    """One rank's training bytes by component (see the module docstring)."""
    sharded = parallel == "fsdp" and world_size > 1
    n = shard_elements(cfg, world_size if sharded else 1, rank)
    out = {"parameters": 4 * n, "gradients": 4 * n, "adamw.m": 4 * n, "adamw.v": 4 * n}
    if sharded:
        d, f = cfg.d_model, cfg.d_ff
        block = 4 * d * d + (3 if cfg.ffn_type == "swiglu" else 2) * d * f
        unit = max(block * (2 if autocast == "bf16" else 4), 2 * cfg.vocab_size * d * 4)
        out["fsdp.gathered_units"] = 2 * unit
    if not cfg.remove_rope:
        out["buffers.rope"] = rope_table_bytes(cfg)
    out.update(saved_activation_bytes(cfg, micro_batch, seq_len, provider=provider, autocast=autocast,
                                      checkpointing=checkpointing))
    if checkpointed_count(cfg.num_layers, checkpointing):
        table = stored_by_provider(provider, autocast)
        out["activations.recompute"] = _bytes(table["layer"], _unit(cfg, micro_batch, seq_len), autocast)
    return out


def max_micro_batch(cfg: ModelConfig, memory_bytes: int, seq_len: int, **kw) -> int:
    """Largest micro-batch whose ``per_rank_memory`` fits ``memory_bytes`` (0 if none). Memory is
    affine in the micro-batch except the TT mask of the torch reference, so search."""
    def need(b: int) -> int:
        return sum(per_rank_memory(cfg, b, seq_len, **kw).values())
    if need(1) > memory_bytes:
        return 0
    lo, hi = 1, 2
    while need(hi) <= memory_bytes:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if need(mid) <= memory_bytes else (lo, mid)
    return lo


def measure_saved_bytes(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                        autocast: str = "none") -> int:
    """Bytes autograd keeps after ``model.loss(x, y)``: every tensor packed by
    ``saved_tensors_hooks`` (by storage, once), plus the inputs checkpointed blocks hold, less
    the parameters and buffers themselves."""
    import torch

    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def note(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen.setdefault(storage.data_ptr(), storage.nbytes())

    def pack(t):
        note(t)
        return t

    hooks = [block.register_forward_pre_hook(lambda _m, args: note(args[0]))
             for block in cast("TransformerLM", model).layers if "forward" in vars(block)]  # the checkpointed ones
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast == "bf16"):
                cast("TransformerLM", model).loss(x, y)
    finally:
        for h in hooks:
            h.remove()
    return sum(seen.values())
