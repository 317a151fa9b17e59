"""Muon (cs336.optim.Muon), the one optimizer builder, and the learning-rate schedules.

Newton-Schulz is checked against the SVD (U V^T); the Muon step against its formula written out
here; the AdamW half against plain AdamW (bitwise); the state against a checkpoint round trip;
the AdamW half of the step on every provider.
"""

import io
import math

import pytest
import torch

from cs336 import ops
from cs336.checkpoint import load_checkpoint, save_checkpoint
from cs336.config import ConfigError, ModelConfig, OptimConfig
from cs336.model import TransformerLM
from cs336.optim import (
    AdamW,
    Muon,
    build_optimizer,
    lr_cosine_schedule,
    lr_wsd_schedule,
    muon_param_names,
    newton_schulz,
    schedule_lr,
    set_group_lrs,
)

CFG = ModelConfig(vocab_size=64, context_length=8, d_model=16, num_layers=2, num_heads=2, d_ff=24, kernels="torch")
HIDDEN = {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.output_proj", "ffn.w1", "ffn.w2", "ffn.w3"}


def model_and_batch(seed=0, cfg=CFG):
    torch.manual_seed(seed)
    model = TransformerLM.from_config(cfg)
    x = torch.randint(0, cfg.vocab_size, (4, cfg.context_length))
    return model, x, torch.roll(x, -1, dims=1)


def train_steps(model, opt, x, y, n, backend="torch"):
    for _ in range(n):
        opt.zero_grad(set_to_none=True)
        model.loss(x, y).backward()
        with ops.use_backend(backend):
            opt.step()


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (32, 32)])
def test_newton_schulz_approximates_the_orthogonal_polar_factor(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    x = newton_schulz(g, steps=5)
    assert x.dtype == torch.bfloat16 and x.shape == g.shape
    s = torch.linalg.svdvals(x.float())
    # The quintic coefficients trade exactness for speed: singular values land in about [0.7, 1.2].
    assert 0.6 < s.min() and s.max() < 1.25, s
    cos = (x.float() * (u @ vh)).sum() / (x.float().norm() * (u @ vh).norm())
    assert cos > 0.95, cos


def test_build_optimizer_adamw_is_todays_adamw():
    model, _, _ = model_and_batch()
    opt = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.05))
    assert type(opt) is AdamW and len(opt.param_groups) == 1
    assert opt.param_groups[0]["params"] == list(model.parameters())
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.param_groups[0]["weight_decay"] == 0.05


def test_build_optimizer_muon_splits_hidden_matrices_from_the_rest():
    model, _, _ = model_and_batch()
    opt = build_optimizer(model, OptimConfig(name="muon", lr=1e-3, muon_lr=2e-2, muon_momentum=0.9, ns_steps=3))
    assert isinstance(opt, Muon)
    muon, rest = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for p in muon["params"]}
    assert muon_names == {f"layers.{i}.{m}.weight" for i in range(2) for m in HIDDEN}
    assert {names[id(p)] for p in rest["params"]} == {n for n, _ in model.named_parameters()} - muon_names
    assert muon["use_muon"] and not rest["use_muon"]
    assert (muon["lr"], muon["momentum"], muon["ns_steps"]) == (2e-2, 0.9, 3)
    assert rest["lr"] == 1e-3
    assert sorted(muon_param_names(model)) == sorted(muon_names)


def test_muon_step_is_its_formula_and_the_adamw_half_is_adamw():
    model, x, y = model_and_batch()
    ref, _, _ = model_and_batch()
    opt = build_optimizer(model, OptimConfig(name="muon", lr=3e-3, muon_lr=1e-2, weight_decay=0.1))
    hidden = set(muon_param_names(ref))
    ref_adam = AdamW([p for n, p in ref.named_parameters() if n not in hidden], lr=3e-3, betas=(0.9, 0.95),
                     eps=1e-8, weight_decay=0.1)
    bufs = {n: torch.zeros_like(p) for n, p in ref.named_parameters() if n in hidden}
    for step in range(3):
        if step == 1:  # after one step the AdamW half has seen identical gradients: bitwise AdamW
            for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
                assert n in hidden or torch.equal(p, q), n
        train_steps(model, opt, x, y, 1)
        ref_adam.zero_grad(set_to_none=True)
        ref.loss(x, y).backward()
        with ops.use_backend("torch"):
            ref_adam.step()
        with torch.no_grad():
            for n, p in ref.named_parameters():
                if n not in hidden:
                    continue
                bufs[n] = torch.lerp(bufs[n], p.grad, 0.05)  # 0.95 B + 0.05 G
                nesterov = torch.lerp(p.grad, bufs[n], 0.95)  # 0.95 B + 0.05 G, Nesterov
                update = newton_schulz(nesterov, 5).float() * (0.2 * math.sqrt(max(p.shape)))
                p.mul_(1 - 1e-2 * 0.1).add_(update, alpha=-1e-2)
                p.grad = None
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q), (n, (p - q).abs().max().item())


def test_muon_state_round_trips_through_a_checkpoint():
    model, x, y = model_and_batch()
    cfg = OptimConfig(name="muon", lr=3e-3)
    opt = build_optimizer(model, cfg)
    train_steps(model, opt, x, y, 2)
    buf = io.BytesIO()
    save_checkpoint(model, opt, 2, buf)
    assert any("momentum_buffer" in s for s in opt.state_dict()["state"].values())
    buf.seek(0)
    model2, _, _ = model_and_batch(seed=5)
    opt2 = build_optimizer(model2, cfg)
    assert load_checkpoint(buf, model2, opt2) == 2
    assert opt2.param_groups[0]["use_muon"] and opt2.param_groups[0]["momentum"] == 0.95
    train_steps(model, opt, x, y, 2)
    train_steps(model2, opt2, x, y, 2)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_muon_runs_its_adamw_half_on_every_provider(backend):
    if not ops.backend_available(backend):
        pytest.skip(f"{backend} cannot run here (triton needs CUDA or TRITON_INTERPRET=1)")
    model, x, y = model_and_batch()
    ref, _, _ = model_and_batch()
    cfg = OptimConfig(name="muon", lr=3e-3)
    opt, ref_opt = build_optimizer(model, cfg), build_optimizer(ref, cfg)
    train_steps(model, opt, x, y, 2, backend=backend)
    train_steps(ref, ref_opt, x, y, 2, backend="torch")
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)


def test_muon_refuses_bad_settings():
    w = torch.nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="momentum"):
        Muon([{"params": [w], "use_muon": True}], momentum=1.0)
    with pytest.raises(ValueError, match="2-D"):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(3))], "use_muon": True}])
    with pytest.raises(ConfigError, match="optim.name"):
        OptimConfig(name="sgd")
    with pytest.raises(ConfigError, match="optim.muon_momentum"):
        OptimConfig(muon_momentum=1.5)


def test_muon_checks_every_group_and_fills_groups_added_later():
    # add_param_group skipped the constructor's checks and defaults: a later group had no
    # use_muon / momentum / ns_steps (KeyError 'use_muon' at step()), a 3-D use_muon group was
    # taken, and a group's own momentum=1.5 or ns_steps=0 was never checked.
    w, extra = torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.randn(4, 2))
    opt = Muon([{"params": [w], "use_muon": True}], lr=0.1, momentum=0.8, ns_steps=3)
    opt.add_param_group({"params": (p for p in [extra]), "use_muon": True})
    assert {k: opt.param_groups[1][k] for k in ("use_muon", "momentum", "ns_steps")} == \
        {"use_muon": True, "momentum": 0.8, "ns_steps": 3}
    assert opt.param_groups[1]["params"] == [extra]
    later = torch.nn.Parameter(torch.randn(5))
    opt.add_param_group({"params": [later]})
    assert opt.param_groups[2]["use_muon"] is False
    for p in (w, extra, later):
        p.grad = torch.randn(p.shape)
    before = later.detach().clone()
    opt.step()
    assert not torch.equal(later.detach(), before)
    with pytest.raises(ValueError, match="2-D weight matrices only, got shapes \\[\\(2, 3, 4\\)\\]"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, 3, 4))], "use_muon": True})
    with pytest.raises(ValueError, match="momentum must lie in"):
        Muon([{"params": [w], "use_muon": True, "momentum": 1.5}])
    with pytest.raises(ValueError, match="ns_steps must be an integer >= 1"):
        Muon([{"params": [w], "use_muon": True, "ns_steps": 0}])
    assert len(opt.param_groups) == 3


def test_wsd_schedule_points():
    kw = dict(max_lr=1.0, min_lr=0.1, warmup_iters=10, decay_start=80, total_iters=100)
    assert lr_wsd_schedule(5, **kw) == 0.5
    assert lr_wsd_schedule(10, **kw) == lr_wsd_schedule(79, **kw) == 1.0
    assert lr_wsd_schedule(90, **kw) == pytest.approx(0.55)  # halfway, linear
    assert lr_wsd_schedule(90, **kw, shape="1-sqrt") == pytest.approx(0.1 + 0.9 * (1 - 0.5 ** 0.5))
    assert lr_wsd_schedule(100, **kw) == lr_wsd_schedule(150, **kw) == 0.1
    with pytest.raises(ValueError, match="shape"):
        lr_wsd_schedule(90, **kw, shape="cubic")


def test_schedule_lr_follows_the_config_and_muon_groups_scale():
    cos = OptimConfig(lr=2e-3, warmup_iters=5)
    assert [schedule_lr(cos, s, 50) for s in (0, 3, 20, 49)] == \
        [lr_cosine_schedule(s, 2e-3, 2e-4, 5, 50) for s in (0, 3, 20, 49)]
    wsd = OptimConfig(lr=2e-3, min_lr=0.0, warmup_iters=5, schedule="wsd", decay_frac=0.2)
    assert schedule_lr(wsd, 39, 50) == 2e-3 and schedule_lr(wsd, 45, 50) == pytest.approx(1e-3)
    model, _, _ = model_and_batch()
    muon_cfg = OptimConfig(name="muon", lr=2e-3, muon_lr=2e-2)
    opt = build_optimizer(model, muon_cfg)
    set_group_lrs(opt, muon_cfg, 1e-3)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2) and opt.param_groups[1]["lr"] == 1e-3


# ------------------------------------------------------------------ FSDP: the whole matrix

def _fsdp_rank(rank: int, world: int, port: int, out: str) -> None:
    import os

    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from cs336.trainer import LossModule

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, x, y = model_and_batch()
    for layer in model.layers:
        fully_shard(layer)
    root = LossModule(model)  # the trainer's wrapper: its forward is the loss, so FSDP gathers for it
    fully_shard(root)
    opt = build_optimizer(model, OptimConfig(name="muon", lr=1e-2))
    assert all(isinstance(p, DTensor) for p in opt.param_groups[0]["params"])
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        root(x, y).backward()  # every rank the same batch: the reduced gradient is one process's
        with ops.use_backend("torch"):
            opt.step()
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save(full, out)
    torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned gloo ranks: tens of seconds on an idle machine, minutes on a loaded one
def test_muon_under_fsdp_orthogonalizes_the_whole_matrix(tmp_path):
    # Sharded over 2 gloo ranks (rows split in two), the update must be that of the whole matrix:
    # Newton-Schulz of one shard alone gives another result.
    import torch.multiprocessing as mp

    from run_helpers import free_port

    mp.spawn(_fsdp_rank, args=(2, free_port(), str(tmp_path / "fsdp.pt")), nprocs=2, join=True)
    model, x, y = model_and_batch()
    train_steps(model, build_optimizer(model, OptimConfig(name="muon", lr=1e-2)), x, y, 2)
    got = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    for name, p in model.state_dict().items():
        torch.testing.assert_close(got[name], p, rtol=1e-6, atol=1e-7, msg=name)


