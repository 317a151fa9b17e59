"""Configuration dataclasses for cs336: four sections nested in ``TrainConfig``.

    model  ModelConfig      the Transformer LM
    optim  OptimConfig      AdamW and the learning-rate schedule
    data   DataConfig       corpus, tokenizer and token files
    train  TrainLoopConfig  the loop: length, batching, evaluation, checkpoints, device, logging

Defaults live here and nowhere else. Named presets are plain functions returning a config
(``MODEL_PRESETS`` for the model section, ``PRESETS`` for a whole run). Each section validates
itself in ``__post_init__`` with the one positive-number check, ``check_positive``. Reading files
and ``section.field=value`` overrides is ``cs336.config_io``; the command-line flags generated
from the fields are ``cs336.cli``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

FFN_TYPES = ("swiglu", "silu")


class ConfigError(ValueError):
    """A user-supplied configuration value is invalid; the message says which and how to fix it."""


def check_positive(name: str, value, *, allow_zero: bool = False, integer: bool = True):
    """``value`` if it is a positive (``allow_zero``: non-negative) integer (``integer=False``: any
    real number); else ConfigError naming ``name``. Booleans are not numbers here."""
    kind = int if integer else (int, float)
    ok = (isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
          and (value >= 0 if allow_zero else value > 0))
    if not ok:
        what = "integer" if integer else "number"
        bound = "non-negative" if allow_zero else "positive"
        raise ConfigError(f"{name} must be a {bound} {what}, got {value!r}"
                          + ("" if integer else " (finite: NaN and infinity are refused)"))
    return value


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r}; valid choices: {', '.join(choices)}")


def kernel_backends() -> tuple[str, ...]:
    """The kernel backends, ``cs336.ops.BACKENDS`` (imported here on use: it imports torch)."""
    from cs336.ops import BACKENDS

    return BACKENDS


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
    """Kernel provider of the model and its optimizer step (cs336.ops.BACKENDS): auto (triton on
    CUDA, else native) | torch (the CS336 reference) | native (PyTorch fused ops) | triton."""
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
            check_positive(f"model.{name}", getattr(self, name))
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
        check_positive("model.rope_theta", self.rope_theta, integer=False)
        check_positive("model.eps", self.eps, integer=False)
        check_choice("model.kernels", self.kernels, kernel_backends())
        check_choice("model.ffn_type", self.ffn_type, FFN_TYPES)

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


# ---------------------------------------------------------------------------------------------
# Optimizer, data and run sections, and the TrainConfig nesting them.
# ---------------------------------------------------------------------------------------------

DATASETS = ("embedded", "tinystories", "owt")
AUTOCAST = ("none", "bf16")

DEVICES = "auto, cpu, cuda, cuda:N, mps"


@dataclass
class OptimConfig:
    lr: float = 3e-3
    """Peak learning rate (reached after warmup)."""
    min_lr: float | None = None
    """Floor of the cosine schedule; None means lr / 10 (see ``floor_lr``)."""
    warmup_iters: int = 30
    """Linear warmup steps from 0 to lr."""
    cosine_cycle_iters: int | None = None
    """Step at which the cosine reaches min_lr; None means train.max_steps."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay."""
    grad_clip: float = 1.0
    """Global L2 norm the gradients are clipped to; 0 disables clipping."""
    fused: bool | None = None
    """AdamW step through the kernel seam (True), reference loop (False), or the model's backend (None)."""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]  # a list from JSON; length checked below
        check_positive("optim.lr", self.lr, integer=False)
        if self.min_lr is not None:
            check_positive("optim.min_lr", self.min_lr, allow_zero=True, integer=False)
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ConfigError(f"optim.min_lr={self.min_lr} exceeds optim.lr={self.lr}; lower min_lr")
        check_positive("optim.warmup_iters", self.warmup_iters, allow_zero=True)
        if self.cosine_cycle_iters is not None:
            check_positive("optim.cosine_cycle_iters", self.cosine_cycle_iters)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas!r}")
        check_positive("optim.eps", self.eps, integer=False)
        check_positive("optim.weight_decay", self.weight_decay, allow_zero=True, integer=False)
        check_positive("optim.grad_clip", self.grad_clip, allow_zero=True, integer=False)

    @property
    def floor_lr(self) -> float:
        """The learning rate the cosine schedule ends at."""
        return self.lr / 10 if self.min_lr is None else self.min_lr


@dataclass
class DataConfig:
    dataset: str = "embedded"
    """Corpus when no files are given: embedded (generated stories), tinystories or owt (downloaded)."""
    train_text: str | None = None
    """UTF-8 training text; a tokenizer is trained on it (model.vocab_size) and it is encoded."""
    valid_text: str | None = None
    """UTF-8 validation text, encoded with the same tokenizer."""
    train_tokens: str | None = None
    """Pre-encoded training tokens (1-D array file with a .json sidecar); needs tokenizer_dir."""
    valid_tokens: str | None = None
    """Pre-encoded validation tokens."""
    tokenizer_dir: str | None = None
    """Directory with vocab.json + merges.txt to use instead of training a tokenizer."""
    special_tokens: tuple[str, ...] = ("<|endoftext|>",)
    """Special tokens of the tokenizer; the first one separates documents."""
    data_dir: str = "data"
    """Where --dataset downloads go (reused when already present)."""
    dataset_base_url: str | None = None
    """Replaces the download location of --dataset files (a mirror, or a local test server)."""
    corpus_mb: float = 6.0
    """Size of the embedded corpus in MB (train + valid)."""
    corpus_seed: int = 1234
    """Seed of the embedded corpus generator."""
    tokenizer_sample_mb: float | None = 16.0
    """Train the tokenizer on the first N MB of the training text (None: all of it)."""

    def __post_init__(self) -> None:
        self.special_tokens = tuple(self.special_tokens)
        check_choice("data.dataset", self.dataset, DATASETS)
        for a, b in (("train_text", "valid_text"), ("train_tokens", "valid_tokens")):
            if (getattr(self, a) is None) != (getattr(self, b) is None):
                raise ConfigError(f"data.{a} and data.{b} go together; give both (--{a.replace('_', '-')} "
                                  f"and --{b.replace('_', '-')}) or neither")
        if self.train_text is not None and self.train_tokens is not None:
            raise ConfigError("give either data.train_text/valid_text or data.train_tokens/valid_tokens, not both")
        if self.train_tokens is not None and self.tokenizer_dir is None:
            raise ConfigError("data.train_tokens needs data.tokenizer_dir (the vocab.json + merges.txt "
                              "the tokens were encoded with)")
        if self.dataset != "embedded" and (self.train_text is not None or self.train_tokens is not None):
            raise ConfigError(f"data.dataset={self.dataset!r} conflicts with explicit train/valid files; "
                              "drop one of them")
        if not self.special_tokens:
            raise ConfigError("data.special_tokens is empty; the first special token separates documents")
        check_positive("data.corpus_mb", self.corpus_mb, integer=False)
        if self.tokenizer_sample_mb is not None:
            check_positive("data.tokenizer_sample_mb", self.tokenizer_sample_mb, integer=False)

    @property
    def source(self) -> str:
        """One of tokens | text | embedded | tinystories | owt."""
        if self.train_tokens is not None:
            return "tokens"
        if self.train_text is not None:
            return "text"
        return self.dataset


@dataclass
class TrainLoopConfig:
    out_dir: str | None = None
    """Run directory; None means runs/<UTC timestamp>."""
    max_steps: int = 800
    """Optimizer steps of the run."""
    batch_size: int = 16
    """Global batch (sequences per optimizer step), split evenly over data-parallel ranks."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step: each rank's rows run in this many forward/backward passes
    of batch_size / (ranks * grad_accum_steps) sequences whose gradients add up (same result)."""
    context_length: int | None = None
    """Training sequence length; None means model.context_length (it may not exceed it)."""
    eval_interval: int = 100
    """Validate every N steps (and at the last step)."""
    eval_batches: int = 8
    """Validation batches per evaluation, taken in order from the start of the valid file."""
    log_interval: int = 10
    """Write a metrics line every N steps."""
    checkpoint_interval: int = 200
    """Save a checkpoint every N steps (and at the end)."""
    keep_last: int = 2
    """Checkpoints kept in checkpoints/ (older ones are deleted)."""
    seed: int = 0
    """Seed for initialization and batch sampling."""
    device: str = "auto"
    """auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps."""
    autocast: str = "none"
    """Mixed precision: none (fp32) or bf16 (torch.autocast; weights and optimizer stay fp32)."""
    tf32: bool = True
    """Allow TF32 matmuls on CUDA."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    threads: int | None = None
    """torch CPU threads; None keeps torch's default."""
    wandb: bool = False
    """Log metrics to Weights & Biases."""
    wandb_mode: str = "offline"
    """wandb mode: offline (files under the run directory) or online."""
    wandb_project: str = "cs336-kernels"
    """wandb project name."""
    wandb_group: str | None = None
    """wandb group (a sweep name, for instance)."""
    profile: bool = False
    """Record a torch.profiler trace of a few steps into <run>/profile."""
    sample_prompt: str = "Once upon a time"
    """Prompt of the sample printed at the end."""
    sample_tokens: int = 120
    """Tokens generated for the final sample; 0 skips it."""
    sample_temperature: float = 0.8
    """Temperature of the final sample."""
    sample_top_p: float = 0.9
    """Nucleus threshold of the final sample."""
    progress: bool = True
    """Show a tqdm progress bar."""
    diverge_loss_factor: float | None = 3.0
    """Stop (before the optimizer step) when the loss exceeds this many times its running mean,
    after 20 steps; None: only a non-finite loss or gradient norm stops the run."""
    diverge_grad_norm: float | None = None
    """Stop when the gradient norm (before clipping) exceeds this; None: no limit."""
    diverge_max_weight: float = 1e4
    """A checkpoint is refused (the run stops as diverged) when a weight's magnitude exceeds this."""

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum_steps", "eval_interval", "eval_batches",
                     "log_interval", "checkpoint_interval", "keep_last"):
            check_positive(f"train.{name}", getattr(self, name))
        if self.context_length is not None:
            check_positive("train.context_length", self.context_length)
        if self.threads is not None:
            check_positive("train.threads", self.threads)
        check_positive("train.sample_tokens", self.sample_tokens, allow_zero=True)
        check_positive("train.sample_temperature", self.sample_temperature, allow_zero=True, integer=False)
        if not 0.0 < self.sample_top_p <= 1.0:
            raise ConfigError(f"train.sample_top_p must be in (0, 1], got {self.sample_top_p!r}")
        if self.diverge_loss_factor is not None and not (math.isfinite(self.diverge_loss_factor)
                                                         and self.diverge_loss_factor > 1):
            raise ConfigError(f"train.diverge_loss_factor must be a finite number > 1 (or none), "
                              f"got {self.diverge_loss_factor!r}")
        if self.diverge_grad_norm is not None:
            check_positive("train.diverge_grad_norm", self.diverge_grad_norm, integer=False)
        check_positive("train.diverge_max_weight", self.diverge_max_weight, integer=False)
        check_choice("train.autocast", self.autocast, AUTOCAST)
        check_choice("train.wandb_mode", self.wandb_mode, ("offline", "online", "disabled"))
        if self.batch_size % self.grad_accum_steps:
            raise ConfigError(f"train.grad_accum_steps={self.grad_accum_steps} does not divide "
                              f"train.batch_size={self.batch_size}; each optimizer step's batch is split into "
                              "grad_accum_steps equal micro-batches, so pick a divisor of batch_size")
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda", "mps") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ConfigError(f"train.device={dev!r}; valid choices: {DEVICES}")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=lambda: demo_model())
    """The Transformer LM; the default is the small CPU model of the main job (demo_model)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and the learning-rate schedule."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus, tokenizer and token files."""
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    """Run length, batching, evaluation, checkpoints, device, logging."""

    def __post_init__(self) -> None:
        ctx = self.train.context_length
        if ctx is not None and ctx > self.model.context_length:
            raise ConfigError(
                f"train.context_length={ctx} exceeds model.context_length={self.model.context_length}; "
                f"lower train.context_length or raise model.context_length")
        if self.data.source != "tokens" and self.model.vocab_size < 256 + len(self.data.special_tokens):
            raise ConfigError(f"model.vocab_size={self.model.vocab_size} is below 256 bytes + "
                              f"{len(self.data.special_tokens)} special tokens; raise it")

    @property
    def context_length(self) -> int:
        """The training sequence length."""
        return self.train.context_length or self.model.context_length


SECTIONS = {"model": ModelConfig, "optim": OptimConfig, "data": DataConfig, "train": TrainLoopConfig}


def demo_model() -> ModelConfig:
    """The main job's model: small enough to learn the embedded corpus on 2 CPU cores in minutes."""
    return ModelConfig(vocab_size=1024, context_length=128, d_model=128, num_layers=4, num_heads=4,
                       d_ff=384, rope_theta=10_000.0)


# ---------------------------------------------------------------------------------------------
# Run presets.
# ---------------------------------------------------------------------------------------------

TINYSTORIES_TOKENS = 327_680_000
"""Tokens processed by the CS336 handout's TinyStories run (section 7.2)."""


def default_config() -> TrainConfig:
    """`python -m cs336.train` with no arguments: the embedded corpus on a CPU in minutes."""
    return TrainConfig()


def tinystories_config(batch_size: int = 128) -> TrainConfig:
    """The handout's TinyStories run: the tinystories model for 327.68M tokens.

    max_steps = 327,680,000 / (batch_size * 256), e.g. 10,000 steps at batch 128. Give the text
    files with --train-text/--valid-text, or --dataset tinystories to download them.
    """
    model = tinystories_model()
    steps = TINYSTORIES_TOKENS // (batch_size * model.context_length)
    return TrainConfig(
        model=model,
        optim=OptimConfig(lr=2e-3, warmup_iters=200, weight_decay=0.1),
        data=DataConfig(tokenizer_sample_mb=None),
        train=TrainLoopConfig(max_steps=steps, batch_size=batch_size, eval_interval=500, eval_batches=50,
                        log_interval=20, checkpoint_interval=1000, autocast="bf16",
                        sample_tokens=256),
    )


def smoke_config() -> TrainConfig:
    """A seconds-long run of a tiny model on a small embedded corpus (tests, quick checks)."""
    return TrainConfig(
        model=ModelConfig(vocab_size=320, context_length=32, d_model=32, num_layers=1, num_heads=2,
                          d_ff=64),
        data=DataConfig(corpus_mb=0.2),
        train=TrainLoopConfig(max_steps=40, batch_size=8, eval_interval=20, eval_batches=4, log_interval=5,
                        checkpoint_interval=20, sample_tokens=20, progress=False),
    )


def profile_config() -> TrainConfig:
    """``python -m cs336.profile`` with no arguments: the TinyStories model, 2 sequences per step."""
    return TrainConfig(model=tinystories_model(), train=TrainLoopConfig(batch_size=2))


def accounting_config() -> TrainConfig:
    """``python -m cs336.accounting`` with no arguments: the TinyStories model, one sequence."""
    return TrainConfig(model=tinystories_model(), train=TrainLoopConfig(batch_size=1))


PRESETS = {"default": default_config, "tinystories": tinystories_config, "smoke": smoke_config,
           "profile": profile_config, "accounting": accounting_config}


def preset(name: str) -> TrainConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; valid choices: {', '.join(PRESETS)}") from None

