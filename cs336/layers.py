"""Building blocks of the Transformer LM, written from tensor ops (CS336 assignment 1, section 3).

``Linear``, ``Embedding``, ``RMSNorm``, the feed-forward networks (``SwiGLU`` and the ``SiLUFFN``
ablation), ``RotaryPositionalEmbedding``, ``scaled_dot_product_attention``,
``MultiHeadSelfAttention`` and the ``KVCache`` it appends to when decoding. RMSNorm, the SwiGLU gate
and attention go through ``cs336.ops`` (the dispatch seam), so the same modules run the reference
PyTorch path or the fused Triton kernels; nothing here chooses a backend. No ``torch.nn.functional``
or ``torch.nn`` layer is used; ``nn.Module``, ``nn.Parameter`` and ``nn.init.trunc_normal_`` are.

Conventions (CS336 handout): Linear weights are ``(d_out, d_in)`` with no bias; RoPE rotates
interleaved pairs ``(x[2k], x[2k+1])`` by the angle ``pos * theta ** (-2k / d_k)``; attention
masks are boolean with True meaning "may attend". Parameter names match the CS336 adapters
(``q_proj``, ``k_proj``, ``v_proj``, ``output_proj``, ``w1``, ``w2``, ``w3``), so state dicts
from other CS336 implementations load.

Deviations: the RoPE cos/sin tables are built in float64 and stored in fp32 (or the requested
float dtype); attention computes its softmax in fp32 for fp16/bf16 inputs (``nn_utils.softmax``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cs336 import ops
from cs336.nn_utils import scaled_dot_product_attention, silu, softmax

__all__ = [
    "Linear", "Embedding", "RMSNorm", "NoNorm", "SwiGLU", "SiLUFFN", "RotaryPositionalEmbedding",
    "scaled_dot_product_attention", "MultiHeadSelfAttention", "KVCache", "LayerKVCache", "silu",
    "softmax",
]


class Linear(nn.Module):
    """y = x W^T, W of shape (out_features, in_features), no bias.

    Init: truncated normal, mean 0, std sqrt(2 / (in + out)), cut at +-3 std (handout 3.4.2).
    """

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        std = math.sqrt(2.0 / (in_features + out_features))
        nn.init.trunc_normal_(self.weight, mean=0.0, std=std, a=-3.0 * std, b=3.0 * std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Embedding(nn.Module):
    """Lookup table: row ``i`` of ``weight`` (num_embeddings, embedding_dim) for token id ``i``.

    Init: truncated normal, mean 0, std 1, cut at +-3.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None, dtype=None):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
        nn.init.trunc_normal_(self.weight, mean=0.0, std=1.0, a=-3.0, b=3.0)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.weight[token_ids]

    def extra_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}"


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, computed in fp32 (``ops.rms_norm``)."""

    def __init__(self, d_model: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.d_model = d_model
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.d_model}, eps={self.eps}"


class NoNorm(nn.Module):
    """The identity, standing in for RMSNorm in the ``remove_rmsnorm`` ablation (no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x); w1, w3: (d_ff, d_model), w2: (d_model, d_ff). Gate via ``ops.swiglu``."""

    def __init__(self, d_model: int, d_ff: int, device=None, dtype=None):
        super().__init__()
        self.w1 = Linear(d_model, d_ff, device=device, dtype=dtype)
        self.w2 = Linear(d_ff, d_model, device=device, dtype=dtype)
        self.w3 = Linear(d_model, d_ff, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(ops.swiglu(self.w1(x), self.w3(x)))


class SiLUFFN(nn.Module):
    """w2(silu(w1 x)), the ungated feed-forward of the ``ffn_type="silu"`` ablation.

    It has 2 * d_model * d_ff parameters against SwiGLU's 3 * d_model * d_ff, so a
    parameter-matched comparison uses 1.5x the SwiGLU d_ff (d_ff = 4 * d_model against
    SwiGLU's 8/3 * d_model, as the handout suggests); the caller chooses d_ff.
    """

    def __init__(self, d_model: int, d_ff: int, device=None, dtype=None):
        super().__init__()
        self.w1 = Linear(d_model, d_ff, device=device, dtype=dtype)
        self.w2 = Linear(d_ff, d_model, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(silu(self.w1(x)))


class RotaryPositionalEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021, RoFormer) on interleaved pairs.

    Pair k of a vector at position p, ``(x[2k], x[2k+1])``, is rotated by the angle
    ``p * theta ** (-2k / d_k)``. The cos/sin tables for positions ``0 .. max_seq_len-1`` are
    non-persistent buffers: they follow ``.to(device)`` but stay out of the state dict.
    """

    cos_pairs: torch.Tensor  # (max_seq_len, d_k), registered as buffers in __init__
    sin_pairs: torch.Tensor

    def __init__(self, theta: float, d_k: int, max_seq_len: int, device=None, dtype=None):
        super().__init__()
        if d_k % 2 != 0:
            raise ValueError(f"RoPE rotates pairs, so d_k must be even; got d_k={d_k}")
        self.theta = theta
        self.d_k = d_k
        self.max_seq_len = max_seq_len
        k = torch.arange(d_k // 2, dtype=torch.float64, device=device)
        inv_freq = theta ** (-2.0 * k / d_k)  # (d_k/2,)
        positions = torch.arange(max_seq_len, dtype=torch.float64, device=device)
        angles = positions[:, None] * inv_freq[None, :]  # (max_seq_len, d_k/2)
        table_dtype = dtype if dtype is not None and dtype.is_floating_point else torch.float32
        cos, sin = torch.cos(angles).to(table_dtype), torch.sin(angles).to(table_dtype)
        # Per-element tables for the rotation: cos_k at 2k and 2k+1, -sin_k at 2k, +sin_k at 2k+1.
        self.register_buffer("cos_pairs", cos.repeat_interleave(2, dim=-1), persistent=False)
        self.register_buffer("sin_pairs", torch.stack((-sin, sin), dim=-1).flatten(-2), persistent=False)

    def forward(self, x: torch.Tensor, token_positions: torch.Tensor | None = None) -> torch.Tensor:
        """x: (..., T, d_k); token_positions: (..., T) integer positions broadcastable against x's
        leading dims (e.g. (T,) or (B, T) for x of shape (B, T, d_k); for (B, H, T, d_k) pass
        (B, 1, T)), or None for positions 0..T-1. Returns x rotated, same shape and dtype."""
        if x.shape[-1] != self.d_k:
            raise ValueError(f"RoPE was built for d_k={self.d_k}, got input with last dim {x.shape[-1]}")
        if token_positions is None:
            cos, sin = self.cos_pairs[: x.shape[-2]], self.sin_pairs[: x.shape[-2]]  # (T, d_k)
        else:
            cos, sin = self.cos_pairs[token_positions], self.sin_pairs[token_positions]  # (..., T, d_k)
        swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (..., T, d_k): x[2k+1], x[2k]
        return (x * cos + swapped * sin).to(x.dtype)

    def extra_repr(self) -> str:
        return f"theta={self.theta}, d_k={self.d_k}, max_seq_len={self.max_seq_len}"


class MultiHeadSelfAttention(nn.Module):
    """Causal multi-head self-attention (Vaswani et al. 2017, section 3.2.2), optionally with RoPE.

    RoPE is used if ``rope`` (a shared ``RotaryPositionalEmbedding``) is given, or if both
    ``max_seq_len`` and ``theta`` are given (a private one is built); otherwise no positional
    encoding is applied. The head dim is d_model / num_heads. ``qk_norm``: an RMSNorm over each
    head's q and each head's k (``q_norm``, ``k_norm``, d_head gains shared by the heads) before
    RoPE, as Qwen3 (Dehghani et al. 2023 normalize q and k the same way).
    """

    def __init__(self, d_model: int, num_heads: int, max_seq_len: int | None = None,
                 theta: float | None = None, *, rope: RotaryPositionalEmbedding | None = None,
                 qk_norm: bool = False, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        if d_model % num_heads != 0:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
        self.d_model = d_model
        self.num_heads = num_heads
        self.d_head = d_model // num_heads
        self.q_proj = Linear(d_model, d_model, device=device, dtype=dtype)
        self.k_proj = Linear(d_model, d_model, device=device, dtype=dtype)
        self.v_proj = Linear(d_model, d_model, device=device, dtype=dtype)
        self.output_proj = Linear(d_model, d_model, device=device, dtype=dtype)
        if rope is None and max_seq_len is not None and theta is not None:
            rope = RotaryPositionalEmbedding(theta, self.d_head, max_seq_len, device=device)
        if rope is not None and rope.d_k != self.d_head:
            raise ValueError(f"RoPE d_k={rope.d_k} differs from the head dim {self.d_head}")
        self.rope = rope
        if qk_norm:
            self.q_norm = RMSNorm(self.d_head, eps=eps, device=device, dtype=dtype)
            self.k_norm = RMSNorm(self.d_head, eps=eps, device=device, dtype=dtype)
        self.qk_norm = qk_norm

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.d_head)).transpose(-3, -2)  # (..., H, T, d_head)

    def forward(self, x: torch.Tensor, token_positions: torch.Tensor | None = None,
                kv_cache: LayerKVCache | None = None) -> torch.Tensor:
        """x: (..., T, d_model); token_positions: (..., T) or (T,), default 0..T-1 (with a cache:
        the cache's positions for its next T columns).

        With ``kv_cache`` (one layer's slot of a ``KVCache``; x is (B, T, d_model)) the new keys
        and values are written after the cached ones and the T queries attend to all of them.
        ``ops.attention`` does the math (causal for a prefill, non-causal for one new query over
        the cache); a padded batch, or several new tokens after cached ones, needs an explicit
        mask and goes through the reference ``scaled_dot_product_attention``.
        """
        seq_len = x.shape[-2]
        q = self._split_heads(self.q_proj(x))  # (..., H, T, d_head)
        k = self._split_heads(self.k_proj(x))
        v = self._split_heads(self.v_proj(x))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            if token_positions is None and kv_cache is not None:
                token_positions = kv_cache.positions(seq_len)
            # (..., 1, T): broadcast over heads; None: positions 0..T-1, read as a table slice
            positions = None if token_positions is None else token_positions.unsqueeze(-2)
            q = self.rope(q, positions)
            k = self.rope(k, positions)
        if kv_cache is None:
            out = ops.attention(q, k, v, causal=True)  # (..., H, T, d_head)
        else:
            k, v = kv_cache.append(k, v)  # (B, H, start + T, d_head)
            mask = kv_cache.mask()
            if mask is None:
                out = ops.attention(q, k, v, causal=kv_cache.start == 0)
            else:
                out = scaled_dot_product_attention(q, k, v, mask)
        out = out.transpose(-3, -2).flatten(-2)  # (..., T, d_model)
        return self.output_proj(out)


class KVCache:
    """Keys and values of every attention layer, kept between decoding steps.

    Preallocated per layer as (B, H, max_len, d_head) (``max_len`` defaults to the model's
    context length); ``length`` columns are filled. A forward pass with the cache writes its T
    new columns after them and attends to all ``length + T``.

    Left padding: row b may start with ``left_pad[b]`` columns that hold no token (prompts of
    different lengths decoded together). Those columns are masked out as keys, and positions
    (for RoPE) count from the row's first real token: column c holds position ``c - left_pad[b]``.
    So a padded row computes exactly what it would alone, up to summation order. A padding
    query attends to itself only, which keeps its (unused) output finite.
    """

    def __init__(self, num_layers: int, batch_size: int, num_heads: int, max_len: int,
                 d_head: int, *, left_pad: torch.Tensor | list[int] | None = None,
                 device=None, dtype=None):
        shape = (batch_size, num_heads, max_len, d_head)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.max_len = max_len
        self.layers = [LayerKVCache(self, i) for i in range(num_layers)]
        self.reset(left_pad)

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    def reset(self, left_pad: torch.Tensor | list[int] | None = None) -> None:
        """Empty the cache (the buffers are reused) and set each row's left padding."""
        self.length = 0
        self._pending = 0
        self.attention_mask: torch.Tensor | None = None
        pad = torch.zeros(self.batch_size, dtype=torch.long) if left_pad is None else \
            torch.as_tensor(left_pad, dtype=torch.long)
        if pad.shape != (self.batch_size,) or int(pad.min()) < 0:
            raise ValueError(f"left_pad must hold {self.batch_size} non-negative counts, got {pad.tolist()}")
        self.left_pad = pad.to(self.device)
        self.padded = bool(pad.any())
        columns = torch.arange(self.max_len, device=self.device)
        self.valid = columns[None, :] >= self.left_pad[:, None]  # (B, max_len): holds a token

    def keep_rows(self, rows: torch.Tensor | list[int]) -> None:
        """Keep only batch rows ``rows`` (in that order), e.g. dropping finished sequences."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.left_pad = self.left_pad.index_select(0, index)
        self.valid = self.valid.index_select(0, index)
        self.padded = bool(self.left_pad.any())

    def positions(self, num_new: int) -> torch.Tensor:
        """(B, num_new) RoPE positions of the next ``num_new`` columns (0 on padding)."""
        columns = torch.arange(self.length, self.length + num_new, device=self.device)
        return (columns[None, :] - self.left_pad[:, None]).clamp(min=0)

    def check_room(self, num_new: int) -> None:
        if self.length + num_new > self.max_len:
            raise ValueError(
                f"the KV cache holds {self.length} of {self.max_len} positions and cannot take "
                f"{num_new} more; reset it and prefill the last {self.max_len} tokens"
            )

    def begin(self, num_new: int) -> None:
        """Start a forward pass over ``num_new`` new columns: check room, build the mask."""
        self.check_room(num_new)
        self._pending = num_new
        self.attention_mask = None
        if self.padded or (self.length > 0 and num_new > 1):
            total = self.length + num_new
            keys = torch.arange(total, device=self.device)  # (S,)
            queries = keys[self.length:, None]  # (T, 1)
            sees = (keys[None, :] <= queries) & (self.valid[:, None, :total] | (keys[None, :] == queries))
            self.attention_mask = sees[:, None]  # (B, 1, T, S): broadcast over heads

    def commit(self) -> None:
        """End the forward pass: the new columns become part of the cache."""
        self.length += self._pending
        self._pending = 0


class LayerKVCache:
    """One layer's slot of a ``KVCache``, handed to that layer's attention."""

    def __init__(self, cache: KVCache, index: int):
        self.cache = cache
        self.index = index

    @property
    def start(self) -> int:
        return self.cache.length

    def positions(self, num_new: int) -> torch.Tensor:
        return self.cache.positions(num_new)

    def mask(self) -> torch.Tensor | None:
        """(B, 1, T, start + T) boolean mask, or None when ``ops.attention`` needs none."""
        return self.cache.attention_mask

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, T, d_head) at the cache's next T columns; return all keys and values
        (B, H, start + T, d_head)."""
        cache, start = self.cache, self.cache.length
        end = start + k.shape[-2]
        keys, values = cache.keys[self.index], cache.values[self.index]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]
