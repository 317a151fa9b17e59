"""The per-rank memory accounting (cs336.memory) against measurement: saved-for-backward bytes
from saved_tensors_hooks on the real model (every provider, fp32 and bf16, with and without
checkpointing), and FSDP's local shard sizes on two gloo ranks."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from cs336.config import ModelConfig
from cs336.memory import measure_saved_bytes, per_rank_memory, saved_activation_bytes, shard_elements
from cs336.model import TransformerLM
from cs336.parallel import apply_activation_checkpointing

# Sizes unlike the ones the table was read off (cs336.memory.STORED).
CFG = dict(vocab_size=200, context_length=96, d_model=64, num_layers=4, num_heads=4, d_ff=176)


def _measure(kernels, autocast, checkpointing, B=3, T=96):
    torch.manual_seed(0)
    model = TransformerLM.from_config(ModelConfig(**CFG, kernels=kernels))
    apply_activation_checkpointing(model, checkpointing)
    x = torch.randint(0, 200, (B, T))
    return measure_saved_bytes(model, x, x, autocast=autocast)


CASES = [(k, a, c) for k in ("torch", "native") for a in ("none", "bf16") for c in ("none", "full", "selective")]
CASES += [("triton", "none", "none"), ("triton", "none", "full"),
          pytest.param("triton", "none", "selective", marks=pytest.mark.slow),  # the interpreter is slow
          ("triton", "bf16", "none"), pytest.param("triton", "bf16", "full", marks=pytest.mark.slow)]


@pytest.mark.parametrize("kernels,autocast,checkpointing", CASES)
def test_saved_bytes_match_measurement(kernels, autocast, checkpointing):
    measured = _measure(kernels, autocast, checkpointing)
    counted = sum(saved_activation_bytes(ModelConfig(**CFG), 3, 96, provider=kernels, autocast=autocast,
                                         checkpointing=checkpointing).values())
    assert counted == pytest.approx(measured, rel=0.10), (counted, measured)


def test_reference_stores_scores_and_fused_paths_do_not():
    """The T x T scores are what the torch provider keeps and native/triton do not (issue 18, 9)."""
    cfg = ModelConfig(**{**CFG, "context_length": 4096})
    ref, native, triton = (sum(saved_activation_bytes(cfg, 1, 4096, provider=p).values())
                           for p in ("torch", "native", "triton"))
    assert ref > 10 * native > 10 * triton / 2 > 0
    assert native > triton


def _shards(rank, world, port, report):
    import torch.distributed as dist

    from cs336.optim import AdamW
    from cs336.parallel import local, shard_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = TransformerLM.from_config(ModelConfig(**CFG, kernels="native"))
        shard_model(model, torch.device("cpu"), "none")
        opt = AdamW(model.parameters())
        x = torch.randint(0, 200, (2, 96))
        model.loss(x, x).backward()
        opt.step()
        params = sum(local(p).numel() * 4 for p in model.parameters())
        grads = sum(local(p.grad).numel() * 4 for p in model.parameters())
        state = sum(local(s[k]).numel() * 4 for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq"))
        torch.save({"params": params, "grads": grads, "state": state}, f"{report}.{rank}")
    finally:
        dist.destroy_process_group()


def test_per_rank_bytes_match_fsdp_local_shards(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    report = tmp_path / "shards"
    mp.spawn(_shards, args=(2, port, str(report)), nprocs=2, join=True)
    cfg = ModelConfig(**CFG)
    for rank in (0, 1):
        got = torch.load(f"{report}.{rank}", weights_only=True)
        mem = per_rank_memory(cfg, 1, 96, provider="native", parallel="fsdp", world_size=2, rank=rank)
        assert got == {"params": mem["parameters"], "grads": mem["gradients"],
                       "state": mem["adamw.m"] + mem["adamw.v"]}
    whole = shard_elements(cfg)
    assert shard_elements(cfg, 2, 0) + shard_elements(cfg, 2, 1) == whole


def test_pre_run_check_uses_the_runs_provider(monkeypatch):
    """A 64k-token context fits when the provider keeps O and the logsumexp; the torch reference,
    which keeps the T x T scores, is refused (issue 18, friction 9: both were refused before)."""
    from cs336 import preflight
    from cs336.config import ConfigError
    from cs336.config_io import apply_overrides
    from cs336.presets import smoke_config

    monkeypatch.setattr(preflight, "device_memory", lambda device: 8 * 10**9)
    cfg = apply_overrides(smoke_config(), ["model.context_length=65536", "model.kernels=native"])
    preflight.check_memory(cfg, torch.device("cpu"), micro_batch=1)
    cfg = apply_overrides(cfg, ["model.kernels=torch"])
    with pytest.raises(ConfigError, match="needs about .* GB .* has 8 GB"):
        preflight.check_memory(cfg, torch.device("cpu"), micro_batch=1)
    preflight.check_memory(apply_overrides(cfg, ["model.context_length=8192"]), torch.device("cpu"), 1)


def test_accounting_cli_takes_the_training_flags(capsys):
    import json

    from cs336.accounting import main

    main(["--model", "gpt2-xl", "--batch-size", "8", "--world-size", "8", "--train.parallel=fsdp",
          "--train.activation_checkpointing=full", "--train.autocast=bf16", "--kernels", "triton",
          "--device-memory", "80GiB", "--json"])
    out = json.loads(capsys.readouterr().out)
    cfg = ModelConfig(**out["config"])
    assert out["micro_batch_per_rank"] == 1
    expect = per_rank_memory(cfg, 1, 1024, provider="triton", autocast="bf16", checkpointing="full",
                             parallel="fsdp", world_size=8)
    assert out["per_rank_by_component"] == expect
    assert expect["parameters"] == 4 * shard_elements(cfg, 8, 0) < 4 * shard_elements(cfg) / 7
    assert sum(per_rank_memory(cfg, out["max_micro_batch_per_rank"], 1024, **out["per_rank_setup"]).values()) \
        <= 80 * 2**30 < sum(per_rank_memory(cfg, out["max_micro_batch_per_rank"] + 1, 1024,
                                            **out["per_rank_setup"]).values())


def test_accounting_cli_rejects_a_batch_the_ranks_cannot_split(capsys):
    from cs336.accounting import main

    with pytest.raises(SystemExit) as exc:
        main(["--batch-size", "6", "--world-size", "4"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--world-size=4" in err


def test_the_rope_tables_are_counted_so_a_huge_model_context_is_refused_before_work(tmp_path, monkeypatch):
    """--model.context_length=1e9 with --train.context_length=32 passed the pre-run check (only the
    training context's activations were counted) and died after data preparation with a traceback
    allocating the 8 GB float64 positions of the RoPE tables."""
    from cs336 import preflight
    from cs336.config_io import apply_overrides
    from cs336.model import TransformerLM
    from cs336.presets import smoke_config

    monkeypatch.setattr(preflight, "device_memory", lambda device: 8 * 10**9)
    cfg = apply_overrides(smoke_config(), ["model.context_length=1000000000", "train.context_length=32",
                                           f"train.out_dir={tmp_path / 'run'}"])
    from cs336.config import ConfigError

    with pytest.raises(ConfigError, match="training this model needs about"):
        preflight.check_memory(cfg, torch.device("cpu"), micro_batch=8)
    small = ModelConfig(vocab_size=300, context_length=64, d_model=32, num_layers=1, num_heads=2, d_ff=64)
    buffers = sum(b.numel() * b.element_size() for b in TransformerLM.from_config(small).buffers())
    counted = per_rank_memory(small, 1, 64, provider="native")["buffers.rope"]
    assert buffers <= counted <= 2 * buffers  # the tables, plus the float64 angles they are built from
    assert "buffers.rope" not in per_rank_memory(ModelConfig(remove_rope=True), 1, 64, provider="native")
