"""A nanoGPT-style PyTorch model of the project's architecture: the baseline for the train step.

What someone writes in an afternoon with PyTorch's own modules (after Karpathy's nanoGPT
``model.py``, with the CS336 architecture): token embedding, pre-norm blocks of ``nn.RMSNorm``,
causal self-attention with one fused q/k/v projection, RoPE on interleaved pairs and
``F.scaled_dot_product_attention(is_causal=True)``, a SwiGLU feed-forward ``w2(silu(w1 x) * w3 x)``,
a final ``nn.RMSNorm`` and an untied LM head; loss ``F.cross_entropy``; optimizer
``torch.optim.AdamW`` (fused on the CPU and CUDA). Linear layers have no bias. The shapes,
parameter count and FLOPs equal ``cs336.model.TransformerLM`` of the same config; only the
implementation differs (bench/bench_model.py times the two against each other).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cs336.config import ModelConfig


def rope_tables(d_head: int, context_length: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of ``pos * theta ** (-2k / d_head)``, each (context_length, d_head / 2)."""
    inv_freq = theta ** (-torch.arange(0, d_head, 2, dtype=torch.float32, device=device) / d_head)
    angles = torch.outer(torch.arange(context_length, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2k], x[2k+1]) of x (B, H, T, D) by the table angles (T, D/2)."""
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, H, T, D/2) each
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.c_attn = nn.Linear(d_model, 3 * d_model, bias=False)
        self.c_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.RMSNorm(cfg.d_model, eps=cfg.eps)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.num_heads)
        self.ln_2 = nn.RMSNorm(cfg.d_model, eps=cfg.eps)
        self.mlp = MLP(cfg.d_model, cfg.d_ff)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cos, sin)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.RMSNorm(cfg.d_model, eps=cfg.eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.d_model // cfg.num_heads, cfg.context_length, cfg.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.to(device)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """idx, targets: (B, T) -> mean cross-entropy."""
        T = idx.shape[1]
        cos, sin = self.cos[:T], self.sin[:T]
        x = self.wte(idx)
        for block in self.h:
            x = block(x, cos, sin)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def optimizer(model: nn.Module, lr: float = 1e-4, weight_decay: float = 0.1) -> torch.optim.AdamW:
    """torch.optim.AdamW, fused where torch has a fused kernel for the device (CPU, CUDA)."""
    device = next(model.parameters()).device.type
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay,
                             fused=device in ("cpu", "cuda"))
