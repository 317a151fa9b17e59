"""Named presets: plain functions that return a config (torchtitan's "configuration programming").

``MODEL_PRESETS`` (``--model NAME``) replace the model section: the CS336 handout's TinyStories
model and the GPT-2 shapes. ``PRESETS`` (``--preset NAME``) are whole runs: ``default`` (the main
job, equal to ``TrainConfig()``), the handout's ``tinystories`` run, a seconds-long ``smoke`` run
for tests, and the starting points of ``cs336.profile`` and ``cs336.accounting``. Defaults stay in
the dataclasses of ``cs336.config``; a preset names only what differs from them.
"""

from __future__ import annotations

from cs336.config import ConfigError, DataConfig, ModelConfig, OptimConfig, TrainConfig, TrainLoopConfig


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


LEADERBOARD_SECONDS = 1.5 * 3600
"""The CS336 leaderboard's budget: 1.5 H100-hours."""
LEADERBOARD_MFU = 0.40
"""Assumed, not measured (no H100 was available): model-FLOPs utilization of a bf16,
torch.compile'd GPT-2-small-sized run on one H100 SXM (dense bf16 peak 989.4 TFLOP/s)."""


def leaderboard_config() -> TrainConfig:
    """The OpenWebText leaderboard run (CS336 assignment 1, section 7.5): 1.5 H100-hours.

    Budget: 5,400 s x 989.4 TFLOP/s x MFU 0.40 (assumed) = 2.14e18 FLOPs. Model: GPT-2 small's
    shape (d_model 768, 12 layers, 12 heads of 64) with SwiGLU d_ff 2048 (8/3 d_model, a multiple
    of 64), the handout's 32K OWT vocabulary, context 1,024: 110M parameters with the embedding
    tied to the head. One step of 128 x 1,024 tokens costs 1.01e14 training FLOPs
    (``cs336.flops.training_flops``), so the budget buys 21,000 steps = 2.75B tokens, 25 tokens per
    parameter: about Chinchilla-optimal (20), the right shape for a fixed-compute race. 128
    sequences do not fit 80 GB at once (the accounting's fp32 activation estimate allows 38), so
    4 micro-batches of 32. The recipe: Muon for the block matrices (AdamW's lr, update RMS
    matched), QK-norm, tied embeddings, logit soft-cap 30 (Gemma 2's), z-loss 1e-4 (PaLM's),
    zero-initialized output projections, and warmup-stable-decay to 0 over the last 20% (a
    fixed-budget run gains from a sharp final decay); bf16 autocast and torch.compile.
    ``python -m cs336.accounting --preset leaderboard --hardware h100 --steps 21000 --mfu 0.4``
    prints the FLOPs and the expected time (1.50 h at that MFU).
    """
    model = ModelConfig(vocab_size=32_000, context_length=1_024, d_model=768, num_layers=12, num_heads=12,
                        d_ff=2_048, rope_theta=10_000.0, qk_norm=True, tie_embeddings=True,
                        logit_softcap=30.0, zero_init_residual=True)
    return TrainConfig(
        model=model,
        optim=OptimConfig(name="muon", lr=3e-3, min_lr=0.0, warmup_iters=500, weight_decay=0.1,
                          schedule="wsd", decay_frac=0.2, decay_shape="linear"),
        data=DataConfig(dataset="owt"),
        train=TrainLoopConfig(max_steps=21_000, batch_size=128, grad_accum_steps=4, eval_interval=1_000,
                              eval_batches=50, log_interval=50, checkpoint_interval=2_000, autocast="bf16",
                              compile=True, z_loss=1e-4, sample_tokens=256,
                              sample_prompt="The"),
    )


def profile_config() -> TrainConfig:
    """``python -m cs336.profile`` with no arguments: the TinyStories model, 2 sequences per step."""
    return TrainConfig(model=tinystories_model(), train=TrainLoopConfig(batch_size=2))


def accounting_config() -> TrainConfig:
    """``python -m cs336.accounting`` with no arguments: the TinyStories model, one sequence."""
    return TrainConfig(model=tinystories_model(), train=TrainLoopConfig(batch_size=1))


PRESETS = {"default": default_config, "tinystories": tinystories_config, "smoke": smoke_config,
           "profile": profile_config, "accounting": accounting_config, "leaderboard": leaderboard_config}


def preset(name: str) -> TrainConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; valid choices: {', '.join(PRESETS)}") from None
