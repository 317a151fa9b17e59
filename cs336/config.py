"""Configuration dataclasses for cs336: four sections nested in ``TrainConfig``.

    model  ModelConfig      the Transformer LM
    optim  OptimConfig      AdamW and the learning-rate schedule
    data   DataConfig       corpus, tokenizer and token files
    train  TrainLoopConfig  the loop: length, batching, evaluation, checkpoints, device, logging

Defaults live here and nowhere else; named presets are ``cs336.presets``. Each section validates
itself in ``__post_init__`` with the one positive-number check, ``check_positive``. Reading files
and ``section.field=value`` overrides is ``cs336.config_io``; the command-line flags generated
from the fields are ``cs336.cli``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import cast

FFN_TYPES = ("swiglu", "silu")
DEVICES = "auto, cpu, cuda, cuda:N, mps"


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


def check_path_given(name: str, value: str | None, *, none: str | None = None) -> None:
    """A path field is None or names something: an empty string (``--out-dir=`` with an unset
    shell variable) would be the current directory, silently."""
    if value is not None and not value.strip():
        instead = f" (or {none})" if none else ""
        raise ConfigError(f"{name} is empty, which would mean the current directory; pass a path{instead}")


def check_device_name(name: str, value: str) -> None:
    """``value`` names a device kind (``cs336.hardware.resolve_device`` checks it is there)."""
    if not (value in ("auto", "cpu", "cuda", "mps") or (value.startswith("cuda:") and value[5:].isdigit())):
        raise ConfigError(f"{name}={value!r}; valid choices: {DEVICES}")


KERNEL_BACKENDS = ("auto", "torch", "native", "triton")
"""``cs336.ops.BACKENDS``, spelled here so that building a config (and every ``--help``) does not
import torch; tests/test_cli.py checks that the two agree."""


def kernel_backends() -> tuple[str, ...]:
    """The kernel backends (``cs336.ops.BACKENDS``)."""
    return KERNEL_BACKENDS


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
    qk_norm: bool = False
    """Recipe: RMSNorm (own gain, d_head wide) of each head's q and k before RoPE (as Qwen3)."""
    tie_embeddings: bool = False
    """Recipe: the LM head shares the token-embedding matrix (initialized as the LM head)."""
    logit_softcap: float | None = None
    """Recipe: logits become C * tanh(logits / C) (training loss and decoding); None: no cap."""
    zero_init_residual: bool = False
    """Recipe: attn.output_proj and ffn.w2 start at zero (each block starts as the identity)."""

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
        if self.logit_softcap is not None:
            check_positive("model.logit_softcap", self.logit_softcap, integer=False)

    @property
    def d_head(self) -> int:
        return self.d_model // self.num_heads



# ---------------------------------------------------------------------------------------------
# Optimizer, data and run sections, and the TrainConfig nesting them.
# ---------------------------------------------------------------------------------------------

DATASETS = ("embedded", "tinystories", "owt")
OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd")
DECAY_SHAPES = ("linear", "1-sqrt")
AUTOCAST = ("none", "bf16")
PARALLEL = ("ddp", "fsdp")
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")



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
    name: str = "adamw"
    """adamw | muon: Muon for the blocks' 2-D weights, AdamW for embeddings, LM head and gains."""
    muon_lr: float | None = None
    """Peak learning rate of the Muon weights; None means optim.lr (the update is scaled to AdamW's
    RMS, 0.2 * sqrt(max(d_out, d_in)), so one rate serves both; arXiv 2502.16982)."""
    muon_momentum: float = 0.95
    """Muon's Nesterov momentum."""
    ns_steps: int = 5
    """Newton-Schulz iterations orthogonalizing each Muon update."""
    schedule: str = "cosine"
    """cosine (handout 4.4) | wsd: warmup, constant lr, then a decay to min_lr over decay_frac."""
    decay_frac: float = 0.2
    """wsd: fraction of train.max_steps spent in the final decay."""
    decay_shape: str = "linear"
    """wsd decay: linear | 1-sqrt (lr falls as 1 - sqrt(progress); Hagele et al. 2024)."""

    def __post_init__(self) -> None:
        self.betas = cast("tuple[float, float]", tuple(self.betas))  # a list when read from JSON
        check_choice("optim.name", self.name, OPTIMIZERS)
        check_choice("optim.schedule", self.schedule, SCHEDULES)
        check_choice("optim.decay_shape", self.decay_shape, DECAY_SHAPES)
        if self.muon_lr is not None:
            check_positive("optim.muon_lr", self.muon_lr, integer=False)
        if not (isinstance(self.muon_momentum, (int, float)) and 0.0 <= self.muon_momentum < 1.0):
            raise ConfigError(f"optim.muon_momentum must be in [0, 1), got {self.muon_momentum!r}")
        check_positive("optim.ns_steps", self.ns_steps)
        if not (isinstance(self.decay_frac, (int, float)) and 0.0 < self.decay_frac <= 1.0):
            raise ConfigError(f"optim.decay_frac must be in (0, 1], got {self.decay_frac!r}")
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
        for name in ("train_text", "valid_text", "train_tokens", "valid_tokens", "tokenizer_dir", "data_dir"):
            check_path_given(f"data.{name}", getattr(self, name))
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
        for tok in self.special_tokens:  # before the corpus is written, not when the tokenizer trains
            if not tok:
                raise ConfigError(f"data.special_tokens {list(self.special_tokens)!r} holds an empty token; "
                                  "drop it (a stray comma in --data.special_tokens?)")
            try:
                tok.encode("utf-8")
            except UnicodeEncodeError:
                raise ConfigError(f"data.special_tokens: {tok!r} holds a lone surrogate, which is not text UTF-8 "
                                  "can store (a command-line byte that is not UTF-8?); pass it as UTF-8") from None
            if self.tokenizer_dir is None and len(tok.encode("utf-8")) == 1:
                raise ConfigError(f"data.special_tokens: {tok!r} is a single byte, which the tokenizer already "
                                  "holds as a byte token; use special tokens of two or more bytes")
        if len(set(self.special_tokens)) != len(self.special_tokens):
            raise ConfigError(f"data.special_tokens {list(self.special_tokens)!r} lists a token twice; "
                              "list each once")
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
    parallel: str = "ddp"
    """Under torchrun: ddp (every rank holds the whole model) or fsdp (FSDP2: parameters,
    gradients and AdamW state sharded over the ranks; cs336.parallel)."""
    activation_checkpointing: str = "none"
    """Recompute block activations in backward: none, full (every block) or selective (every
    other block)."""
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
    z_loss: float = 0.0
    """Recipe: adds z_loss * mean(logsumexp(logits)^2) to the training loss (PaLM); 0 disables.
    Validation reports the plain cross-entropy."""

    def __post_init__(self) -> None:
        check_path_given("train.out_dir", self.out_dir, none="none for a new runs/<time> directory")
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
        check_positive("train.z_loss", self.z_loss, allow_zero=True, integer=False)
        check_choice("train.autocast", self.autocast, AUTOCAST)
        check_choice("train.parallel", self.parallel, PARALLEL)
        check_choice("train.activation_checkpointing", self.activation_checkpointing, ACTIVATION_CHECKPOINTING)
        check_choice("train.wandb_mode", self.wandb_mode, ("offline", "online", "disabled"))
        if self.batch_size % self.grad_accum_steps:
            raise ConfigError(f"train.grad_accum_steps={self.grad_accum_steps} does not divide "
                              f"train.batch_size={self.batch_size}; each optimizer step's batch is split into "
                              "grad_accum_steps equal micro-batches, so pick a divisor of batch_size")
        check_device_name("train.device", self.device)


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
