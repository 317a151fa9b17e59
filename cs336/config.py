"""Configuration dataclasses for cs336.

Defaults live here and nowhere else. Named presets are plain functions returning a config.
"""

from __future__ import annotations

from dataclasses import dataclass

KERNEL_BACKENDS = ("auto", "torch", "triton")
FFN_TYPES = ("swiglu", "silu")


class ConfigError(ValueError):
    """A user-supplied configuration value is invalid; the message says which and how to fix it."""


@dataclass
class ModelConfig:
    vocab_size: int = 10_000
    """Number of token ids (embedding rows and LM-head outputs)."""
    context_length: int = 256
    """Longest sequence the model accepts (RoPE cache length)."""
    d_model: int = 512
    """Residual stream width."""
    num_layers: int = 4
    """Number of Transformer blocks."""
    num_heads: int = 16
    """Attention heads; d_model must be divisible by it and the head dim must be even (RoPE)."""
    d_ff: int = 1344
    """Hidden width of the feed-forward network."""
    rope_theta: float = 10_000.0
    """RoPE base: angle for pair k at position p is p * theta ** (-2k / d_head)."""
    eps: float = 1e-5
    """RMSNorm epsilon."""
    kernels: str = "auto"
    """Kernel backend for RMSNorm / SwiGLU / cross-entropy: auto | torch | triton."""
    remove_rmsnorm: bool = False
    """Ablation: drop every RMSNorm in the blocks (the final norm too)."""
    use_post_norm: bool = False
    """Ablation: post-norm blocks, z = norm(x + attn(x)), y = norm(z + ffn(z))."""
    remove_rope: bool = False
    """Ablation: no positional encoding at all (NoPE)."""
    ffn_type: str = "swiglu"
    """Feed-forward type: swiglu = w2(silu(w1 x) * w3 x); silu = w2(silu(w1 x))."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.num_heads != 0:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.num_heads={self.num_heads}; "
                "choose num_heads among the divisors of d_model"
            )
        if (self.d_model // self.num_heads) % 2 != 0 and not self.remove_rope:
            raise ConfigError(
                f"head dim d_model/num_heads = {self.d_model // self.num_heads} is odd; RoPE rotates "
                "pairs, so pick num_heads giving an even head dim (or set model.remove_rope=true)"
            )
        if self.rope_theta <= 0:
            raise ConfigError(f"model.rope_theta must be positive, got {self.rope_theta!r}")
        if self.eps <= 0:
            raise ConfigError(f"model.eps must be positive, got {self.eps!r}")
        if self.kernels not in KERNEL_BACKENDS:
            raise ConfigError(f"model.kernels={self.kernels!r}; valid choices: {', '.join(KERNEL_BACKENDS)}")
        if self.ffn_type not in FFN_TYPES:
            raise ConfigError(f"model.ffn_type={self.ffn_type!r}; valid choices: {', '.join(FFN_TYPES)}")

    @property
    def d_head(self) -> int:
        return self.d_model // self.num_heads


# Named model presets. GPT-2 shapes (layers, width, heads) are those of the GPT-2 paper; with this
# architecture (SwiGLU, untied embeddings, RoPE, no biases) d_ff = 4 * d_model as in the CS336
# handout's accounting question, vocab 50,257 and context 1,024.
def tinystories_model() -> ModelConfig:
    """The CS336 handout's TinyStories model (section 7.2)."""
    return ModelConfig(vocab_size=10_000, context_length=256, d_model=512, num_layers=4,
                       num_heads=16, d_ff=1344, rope_theta=10_000.0)


def _gpt2(d_model: int, num_layers: int, num_heads: int) -> ModelConfig:
    return ModelConfig(vocab_size=50_257, context_length=1_024, d_model=d_model,
                       num_layers=num_layers, num_heads=num_heads, d_ff=4 * d_model,
                       rope_theta=10_000.0)


def gpt2_small() -> ModelConfig:
    return _gpt2(768, 12, 12)


def gpt2_medium() -> ModelConfig:
    return _gpt2(1024, 24, 16)


def gpt2_large() -> ModelConfig:
    return _gpt2(1280, 36, 20)


def gpt2_xl() -> ModelConfig:
    return _gpt2(1600, 48, 25)


MODEL_PRESETS = {
    "tinystories": tinystories_model,
    "gpt2-small": gpt2_small,
    "gpt2-medium": gpt2_medium,
    "gpt2-large": gpt2_large,
    "gpt2-xl": gpt2_xl,
}


def model_preset(name: str) -> ModelConfig:
    try:
        return MODEL_PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; valid choices: {', '.join(MODEL_PRESETS)}") from None
