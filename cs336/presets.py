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
