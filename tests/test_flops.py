"""cs336.flops and cs336.hardware: the analytic accounting against the real model and by hand."""

import re
from collections import Counter

import pytest
import torch

from cs336 import flops, hardware
from cs336.config import ConfigError, ModelConfig
from cs336.model import TransformerLM
from cs336.presets import MODEL_PRESETS, model_preset


def _grouped_numel(model: torch.nn.Module) -> Counter:
    counts: Counter = Counter()
    for name, p in model.named_parameters():
        counts[re.sub(r"^layers\.\d+\.", "layers.*.", name)] += p.numel()
    return counts


CONFIGS = [(name, {}) for name in MODEL_PRESETS] + [
    ("tinystories", {"ffn_type": "silu", "d_ff": 2048}),
    ("tinystories", {"remove_rmsnorm": True}),
    ("tinystories", {"qk_norm": True}),
    ("tinystories", {"tie_embeddings": True}),
    ("gpt2-small", {"qk_norm": True, "tie_embeddings": True}),
]


@pytest.mark.parametrize(("preset", "changes"), CONFIGS, ids=[f"{p}-{c}" for p, c in CONFIGS])
def test_param_counts_match_real_model_by_tensor(preset, changes):
    cfg = model_preset(preset)
    for key, value in changes.items():
        setattr(cfg, key, value)
    model = TransformerLM.from_config(ModelConfig(**cfg.__dict__), device="meta")
    real = _grouped_numel(model)
    analytic = flops.param_counts(cfg)
    assert dict(real) == analytic
    assert flops.num_params(cfg) == sum(p.numel() for p in model.parameters())


def test_tinystories_params_by_hand():
    # Embedding and LM head: 2 * 10000 * 512 = 10,240,000. Per layer: 4 * 512^2 (attention)
    # + 3 * 512 * 1344 (SwiGLU) + 2 * 512 (norms) = 3,113,984; 4 layers = 12,455,936. Final norm 512.
    assert flops.num_params(model_preset("tinystories")) == 10_240_000 + 12_455_936 + 512


@pytest.mark.parametrize("preset", list(MODEL_PRESETS))
@pytest.mark.parametrize("batch", [1, 3])
def test_forward_flops_equal_params_formula(preset, batch):
    # Independent form: every weight except the embedding and the norms is used once per token in
    # a matmul (2 FLOPs per weight per token), plus Q K^T and A V: 2 * 2 * B * T^2 * d per layer.
    cfg = model_preset(preset)
    counts = flops.param_counts(cfg)
    matmul_weights = sum(v for k, v in counts.items() if "proj" in k or "ffn" in k or "lm_head" in k)
    T, tokens = cfg.context_length, batch * cfg.context_length
    expected = 2 * tokens * matmul_weights + cfg.num_layers * 4 * batch * T * T * cfg.d_model
    assert flops.total_forward_flops(cfg, batch) == expected


def test_attention_share_grows_with_context():
    cfg = model_preset("gpt2-xl")
    short = flops.fractions(flops.forward_flops(cfg, 1, 1024))
    long = flops.fractions(flops.forward_flops(cfg, 1, 16384))
    assert long["attn.qk"] > 5 * short["attn.qk"]
    assert abs(sum(long.values()) - 1.0) < 1e-12


def test_memory_rows_and_max_batch():
    cfg = model_preset("gpt2-small")
    m1 = flops.training_memory(cfg, 1)
    m4 = flops.training_memory(cfg, 4)
    assert m1["parameters"] == m1["gradients"] == m1["adamw.m"] == m1["adamw.v"] == 4 * flops.num_params(cfg)
    act1 = sum(v for k, v in m1.items() if k.startswith("activations."))
    act4 = sum(v for k, v in m4.items() if k.startswith("activations."))
    assert act4 == 4 * act1
    # The handout's scores and softmax terms: B * heads * T^2 floats per layer, 4 bytes each.
    assert m1["activations.layers.*.attn.softmax"] == 4 * cfg.num_layers * cfg.num_heads * 1024**2
    limit = 80 * 2**30
    b = flops.max_batch_size(cfg, limit)
    assert b > 0
    assert sum(flops.training_memory(cfg, b).values()) <= limit < sum(flops.training_memory(cfg, b + 1).values())
    assert flops.max_batch_size(model_preset("gpt2-xl"), 2**30) == 0


def test_training_time():
    cfg = model_preset("tinystories")
    seconds = flops.training_time_seconds(cfg, 32, 1000, peak_flops=1e12, mfu=0.5)
    # The handout's TinyStories model, by hand: 17.6M matmul weights x 2 x 8192 tokens = 2.88e11
    # FLOPs, attention 4 x 4 x 32 x 256^2 x 512 = 1.7e10, so 3.05e11 forward and 9.2e11 per step
    # with the backward; 1000 steps at 5e11 FLOP/s: about 1,830 s.
    assert 1750 < seconds < 1900
    assert flops.training_time_seconds(cfg, 64, 1000, peak_flops=1e12, mfu=0.5) > 2 * seconds * 0.99
    with pytest.raises(ConfigError, match="mfu"):
        flops.training_time_seconds(cfg, 32, 1000, peak_flops=1e12, mfu=0.0)
    with pytest.raises(ConfigError, match="steps"):
        flops.training_time_seconds(cfg, 32, 0, peak_flops=1e12, mfu=0.5)


def test_non_positive_sizes_raise():
    cfg = model_preset("tinystories")
    with pytest.raises(ConfigError, match="batch_size"):
        flops.forward_flops(cfg, 0)
    with pytest.raises(ConfigError, match="seq_len"):
        flops.activation_counts(cfg, 1, -5)
    with pytest.raises(ConfigError, match="memory_bytes"):
        flops.max_batch_size(cfg, 0)


@pytest.mark.parametrize("op", ["rms_norm", "swiglu", "cross_entropy", "linear_cross_entropy"])
def test_op_cost_passes_add_up(op):
    shape = dict(M=64, N=1000, K=32)
    fwd, bwd, both = (flops.op_cost(op, p, **shape) for p in flops.PASSES)
    assert both.flops == fwd.flops + bwd.flops and both.bytes == fwd.bytes + bwd.bytes
    assert fwd.bytes > 0 and bwd.flops > 0


def test_op_cost_values_and_errors():
    assert flops.op_cost("rms_norm", "fwd", M=2, N=8).bytes == (2 * 2 * 8 + 8) * 4
    lce = flops.op_cost("linear_cross_entropy", "fwd", M=4, N=10, K=6)
    assert lce.matmul_flops == 2 * 4 * 6 * 10
    assert flops.op_cost("adamw", "fwd+bwd", M=100, N=0).bytes == 7 * 100 * 4
    with pytest.raises(ConfigError, match="valid choices"):
        flops.op_cost("layer_norm", "fwd", M=1, N=1)
    with pytest.raises(ConfigError, match="valid choices"):
        flops.op_cost("rms_norm", "backward", M=1, N=1)


def test_humanize():
    assert flops.humanize(2_127_057_600, "") == "2.13 G"
    assert flops.humanize(80 * 2**30, "B", 1024) == "80 GiB"
    assert flops.humanize(0, "B") == "0 B"


@pytest.mark.parametrize(("name", "key"), [
    ("NVIDIA H100 80GB HBM3", "h100-sxm"), ("NVIDIA H100 PCIe", "h100-pcie"),
    ("NVIDIA H100 NVL", "h100-nvl"), ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA B200", "b200"), ("NVIDIA L4", "l4"),
])
def test_device_names_match_table(name, key):
    assert hardware.match_device_name(name).key == key


def test_device_table_and_errors():
    assert hardware.match_device_name("NVIDIA L40S") is None
    assert hardware.lookup("H100") is hardware.DEVICES["h100-sxm"]
    assert hardware.DEVICES["b200"].bf16_flops == 2.25e15  # dense, not the 4.5e15 sparse figure
    with pytest.raises(hardware.UnknownDeviceError, match="valid choices: h100-sxm"):
        hardware.lookup("tpu-v5")


def test_cpu_measurements_positive():
    assert hardware.measure_cpu_matmul_flops(n=256, repeats=1) > 1e6
    assert hardware.measure_cpu_copy_bandwidth(numel=2**16, repeats=1) > 1e6
    info = hardware.versions()
    assert info["torch"] == torch.__version__ and "triton" in info


def test_leaderboard_preset_counts_its_tied_head_once():
    from cs336.presets import leaderboard_config
    cfg = leaderboard_config().model
    model = TransformerLM.from_config(cfg, device="meta")
    assert flops.num_params(cfg) == sum(p.numel() for p in model.parameters())
    assert "lm_head.weight" not in flops.param_counts(cfg)
    assert 109e6 < flops.num_params(cfg) < 111e6  # the preset's docstring: 110M tied
