"""The Transformer language model of CS336 assignment 1 (section 3.5), with the ablation switches of 7.3.

Pre-norm blocks ``h = x + attn(ln1(x))``, ``y = h + ffn(ln2(h))``; token embedding, the blocks, a final
RMSNorm and an untied LM head; one RoPE table shared by every block. The layers live in ``cs336.layers``
and are re-exported here (the one import of the model API). Deviations, each off by default (at the
defaults the state dict is the handout's): ``remove_rmsnorm`` (``NoNorm``; the ``ln*`` weights leave the
state dict), ``use_post_norm`` (``z = ln1(x + attn(x))``, ``y = ln2(z + ffn(z))``, ``ln_final`` stays),
``remove_rope`` (NoPE), ``ffn_type="silu"`` (``w2(silu(w1 x))``, no ``w3``; use a d_ff 1.5x SwiGLU's to
match parameters); the leaderboard recipe's ``qk_norm`` (``attn.q_norm``/``k_norm`` before RoPE),
``tie_embeddings`` (one matrix initialized as the LM head, both names kept; an untied state dict is
refused), ``logit_softcap`` (``C tanh(logits / C)`` in forward and loss) and ``zero_init_residual``
(``output_proj`` and ``w2`` start at 0). ``forward``/``loss`` run under ``ops.use_backend(self.kernels)``;
``loss`` calls ``ops.linear_cross_entropy``. With a ``KVCache`` (``new_kv_cache``) ``forward`` runs only
the new tokens; its logits equal a full forward up to summation order.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn

from cs336 import ops
from cs336.config import ModelConfig
from cs336.layers import (
    Embedding,
    KVCache,
    LayerKVCache,
    Linear,
    MultiHeadSelfAttention,
    NoNorm,
    RMSNorm,
    RotaryPositionalEmbedding,
    SiLUFFN,
    SwiGLU,
    scaled_dot_product_attention,
    silu,
    softmax,
)
from cs336.nn_utils import softcap

__all__ = [
    "Linear", "Embedding", "RMSNorm", "NoNorm", "SwiGLU", "SiLUFFN", "RotaryPositionalEmbedding",
    "MultiHeadSelfAttention", "TransformerBlock", "TransformerLM", "KVCache", "silu", "softmax",
    "scaled_dot_product_attention",
]


def _norm(d_model: int, eps: float, remove: bool, device, dtype) -> nn.Module:
    return NoNorm() if remove else RMSNorm(d_model, eps=eps, device=device, dtype=dtype)


class TransformerBlock(nn.Module):
    """One Transformer block: causal self-attention and a feed-forward network, each with a
    residual connection and an RMSNorm (pre-norm by default; see the module docstring for the
    switches).

    RoPE: pass a shared ``rope`` module, or ``max_seq_len`` and ``theta`` to build one, or
    ``remove_rope=True`` for none.
    """

    def __init__(self, d_model: int, num_heads: int, d_ff: int, max_seq_len: int | None = None,
                 theta: float | None = None, *, rope: RotaryPositionalEmbedding | None = None,
                 eps: float = 1e-5, remove_rmsnorm: bool = False, use_post_norm: bool = False,
                 remove_rope: bool = False, ffn_type: str = "swiglu", qk_norm: bool = False,
                 zero_init_residual: bool = False, device=None, dtype=None):
        super().__init__()
        if remove_rope:
            rope, max_seq_len, theta = None, None, None
        self.use_post_norm = use_post_norm
        self.attn = MultiHeadSelfAttention(d_model, num_heads, max_seq_len, theta, rope=rope,
                                           qk_norm=qk_norm, eps=eps, device=device, dtype=dtype)
        self.ln1 = _norm(d_model, eps, remove_rmsnorm, device, dtype)
        if ffn_type == "swiglu":
            self.ffn: SwiGLU | SiLUFFN = SwiGLU(d_model, d_ff, device=device, dtype=dtype)
        elif ffn_type == "silu":
            self.ffn = SiLUFFN(d_model, d_ff, device=device, dtype=dtype)
        else:
            raise ValueError(f"ffn_type={ffn_type!r}; valid choices: swiglu, silu")
        self.ln2 = _norm(d_model, eps, remove_rmsnorm, device, dtype)
        if zero_init_residual:  # after the usual init, so the RNG stream is that of the default
            nn.init.zeros_(self.attn.output_proj.weight)
            nn.init.zeros_(self.ffn.w2.weight)

    def forward(self, x: torch.Tensor, token_positions: torch.Tensor | None = None,
                kv_cache: LayerKVCache | None = None) -> torch.Tensor:
        """x: (..., T, d_model) -> (..., T, d_model); ``kv_cache``: this block's cache slot."""
        if self.use_post_norm:
            z = self.ln1(x + self.attn(x, token_positions, kv_cache))
            return self.ln2(z + self.ffn(z))
        h = x + self.attn(self.ln1(x), token_positions, kv_cache)
        return h + self.ffn(self.ln2(h))


class TransformerLM(nn.Module):
    """Decoder-only Transformer LM; ``forward(token_ids) -> logits`` of shape (..., T, vocab_size).

    The arguments are those of ``cs336.config.ModelConfig`` (validated there; ``self.config``
    holds it) plus ``device`` and ``dtype`` for the parameters.
    """

    def __init__(self, vocab_size: int, context_length: int, d_model: int, num_layers: int,
                 num_heads: int, d_ff: int, rope_theta: float, *, eps: float = 1e-5,
                 kernels: str = "auto", remove_rmsnorm: bool = False, use_post_norm: bool = False,
                 remove_rope: bool = False, ffn_type: str = "swiglu", qk_norm: bool = False,
                 tie_embeddings: bool = False, logit_softcap: float | None = None,
                 zero_init_residual: bool = False, device=None, dtype=None):
        super().__init__()
        self.config = ModelConfig(
            vocab_size=vocab_size, context_length=context_length, d_model=d_model,
            num_layers=num_layers, num_heads=num_heads, d_ff=d_ff, rope_theta=rope_theta, eps=eps,
            kernels=kernels, remove_rmsnorm=remove_rmsnorm, use_post_norm=use_post_norm,
            remove_rope=remove_rope, ffn_type=ffn_type, qk_norm=qk_norm, tie_embeddings=tie_embeddings,
            logit_softcap=logit_softcap, zero_init_residual=zero_init_residual)
        self.token_embeddings = Embedding(vocab_size, d_model, device=device, dtype=dtype)
        rope = None if remove_rope else RotaryPositionalEmbedding(
            rope_theta, d_model // num_heads, context_length, device=device)
        self.layers = nn.ModuleList(
            TransformerBlock(d_model, num_heads, d_ff, rope=rope, eps=eps,
                             remove_rmsnorm=remove_rmsnorm, use_post_norm=use_post_norm,
                             remove_rope=remove_rope, ffn_type=ffn_type, qk_norm=qk_norm,
                             zero_init_residual=zero_init_residual, device=device, dtype=dtype)
            for _ in range(num_layers))
        self.ln_final = _norm(d_model, eps, remove_rmsnorm, device, dtype)
        self.lm_head = Linear(d_model, vocab_size, device=device, dtype=dtype)
        if tie_embeddings:
            # The LM head's init (std sqrt(2 / (V + d))): the embedding's std 1 would make the
            # initial logits sqrt(d_model) times too large.
            self.token_embeddings.weight = self.lm_head.weight
            self._register_load_state_dict_pre_hook(self._check_tied_state)

    @staticmethod
    def _check_tied_state(state_dict, prefix, *args) -> None:
        """Refuse an untied state dict for a tied model (its embedding and head would collapse
        silently into whichever loads last)."""
        emb, head = state_dict.get(prefix + "token_embeddings.weight"), state_dict.get(prefix + "lm_head.weight")
        if emb is not None and head is not None and (emb.shape != head.shape or not torch.equal(emb, head)):
            raise RuntimeError("the state dict has an untied LM head (lm_head.weight differs from "
                               "token_embeddings.weight) but this model has model.tie_embeddings=true; "
                               "build it with tie_embeddings=false to load these weights")

    @property
    def context_length(self) -> int:
        return self.config.context_length

    @property
    def kernels(self) -> str:
        """The kernel backend this model runs under (``auto``, ``torch``, ``native`` or ``triton``)."""
        return self.config.kernels

    @kernels.setter
    def kernels(self, name: str) -> None:
        if name not in ops.BACKENDS:
            raise ValueError(f"kernels={name!r}; valid choices: {', '.join(ops.BACKENDS)}")
        self.config.kernels = name

    @classmethod
    def from_config(cls, cfg: ModelConfig, device=None, dtype=None) -> TransformerLM:
        return cls(**asdict(cfg), device=device, dtype=dtype)

    def new_kv_cache(self, batch_size: int = 1, *, left_pad: list[int] | None = None,
                     max_len: int | None = None) -> KVCache:
        """An empty ``KVCache`` for ``batch_size`` rows of up to ``max_len`` (default
        ``context_length``) positions, on this model's device and in its parameter dtype."""
        weight = self.lm_head.weight
        return KVCache(len(self.layers), batch_size, self.config.num_heads,
                       max_len or self.context_length, self.config.d_head, left_pad=left_pad,
                       device=weight.device, dtype=weight.dtype)

    def _check_input(self, token_ids: torch.Tensor, token_positions: torch.Tensor | None,
                     kv_cache: KVCache | None = None) -> None:
        seq_len = token_ids.shape[-1]
        if kv_cache is not None and (token_ids.dim() != 2 or token_ids.shape[0] != kv_cache.batch_size):
            raise ValueError(f"with a KV cache of {kv_cache.batch_size} rows the input must be "
                             f"(batch={kv_cache.batch_size}, T); got shape {tuple(token_ids.shape)}")
        if kv_cache is not None:
            kv_cache.check_room(seq_len)
        if seq_len > self.context_length:
            raise ValueError(
                f"input has {seq_len} tokens but the model's context_length is "
                f"{self.context_length}; truncate the input to its last {self.context_length} "
                "tokens (or build a model with a longer context_length)"
            )
        if token_positions is not None and token_positions.numel() > 0:
            top = int(token_positions.max())
            if top >= self.context_length or int(token_positions.min()) < 0:
                raise ValueError(
                    f"token_positions must lie in [0, {self.context_length - 1}] (context_length "
                    f"{self.context_length}); got positions up to {top}"
                )

    def hidden_states(self, token_ids: torch.Tensor, token_positions: torch.Tensor | None = None,
                      kv_cache: KVCache | None = None) -> torch.Tensor:
        """The final-norm output (..., T, d_model), the input of the LM head."""
        if kv_cache is not None and token_positions is None:
            token_positions = kv_cache.positions(token_ids.shape[-1])  # (B, T)
        self._check_input(token_ids, token_positions, kv_cache)
        with ops.use_backend(self.kernels):
            x = self.token_embeddings(token_ids)  # (..., T, d_model)
            if kv_cache is None:
                for layer in self.layers:
                    x = layer(x, token_positions)
                return self.ln_final(x)
            kv_cache.begin(token_ids.shape[-1])
            for layer, slot in zip(self.layers, kv_cache.layers, strict=True):
                x = layer(x, token_positions, slot)
            kv_cache.commit()
            return self.ln_final(x)

    def forward(self, token_ids: torch.Tensor, token_positions: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        """token_ids: (..., T) with T <= context_length -> logits (..., T, vocab_size).

        With ``kv_cache`` (from ``new_kv_cache``): token_ids (B, T) are the next T tokens of each
        row, run at the cache's next positions against everything cached; the cache grows by T.
        """
        logits = self.lm_head(self.hidden_states(token_ids, token_positions, kv_cache))
        return softcap(logits, self.config.logit_softcap)

    def loss(self, token_ids: torch.Tensor, targets: torch.Tensor,
             ignore_index: int = -100, z_loss: float = 0.0) -> torch.Tensor:
        """Mean next-token cross-entropy over all positions whose target is not ``ignore_index``
        (of the soft-capped logits with ``logit_softcap``), plus ``z_loss * mean(lse**2)``."""
        h = self.hidden_states(token_ids)
        with ops.use_backend(self.kernels):
            return ops.linear_cross_entropy(h, self.lm_head.weight, targets, ignore_index,
                                            logit_softcap=self.config.logit_softcap, z_loss=z_loss)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count; ``exclude_embeddings`` leaves out the token embedding table (the LM
        head is untied and counted, as the handout's accounting does)."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.token_embeddings.weight.numel()
        return total
