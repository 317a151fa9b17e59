"""Tests for cs336.experiments: the handout's SGD learning-rate toy, its command line, and the
named experiments (with training replaced by a fake)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cs336 import experiments, presets


def test_sgd_step_matches_decaying_rule():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = experiments.SGD([p], lr=0.5)
    for t, grad in enumerate([torch.tensor([1.0, 1.0]), torch.tensor([2.0, -1.0]), torch.tensor([0.5, 4.0])]):
        before = p.detach().clone()
        p.grad = grad
        opt.step()
        torch.testing.assert_close(p.detach(), before - 0.5 / math.sqrt(t + 1) * grad)


def test_sgd_skips_parameters_without_grad_and_keeps_per_parameter_time():
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(3))
    opt = experiments.SGD([a, b], lr=1.0)
    a.grad = torch.ones(3)
    opt.step()  # b has no grad: untouched, its clock does not start
    torch.testing.assert_close(b.detach(), torch.ones(3))
    b.grad = torch.ones(3)
    opt.step()  # a at t = 1, b at t = 0
    torch.testing.assert_close(a.detach(), torch.full((3,), -1.0 / math.sqrt(2)))
    torch.testing.assert_close(b.detach(), torch.zeros(3))


def test_sgd_returns_closure_loss_and_rejects_negative_lr():
    p = torch.nn.Parameter(torch.tensor([3.0]))
    opt = experiments.SGD([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == pytest.approx(9.0)
    assert p.item() == pytest.approx(3.0 - 0.1 * 6.0)
    with pytest.raises(ValueError, match="non-negative"):
        experiments.SGD([p], lr=-1.0)


def test_toy_loss_follows_closed_form():
    # grad of mean(w**2) over 100 entries is w / 50, so w_{t+1} = w_t (1 - lr / (50 sqrt(t + 1)))
    # and loss_{t+1} = loss_t (1 - lr / (50 sqrt(t + 1)))**2.
    for lr in (1e1, 1e2, 1e3):
        losses = experiments.sgd_toy(lr, steps=6, seed=3)
        for t in range(5):
            factor = (1 - lr / (50 * math.sqrt(t + 1))) ** 2
            assert losses[t + 1] == pytest.approx(losses[t] * factor, rel=1e-4)


def test_toy_lr_1e1_decreases_1e2_converges_1e3_diverges():
    l1, l2, l3 = (experiments.sgd_toy(lr) for lr in (1e1, 1e2, 1e3))
    assert len(l1) == len(l2) == len(l3) == 10
    assert l1[0] == l2[0] == l3[0] == pytest.approx(25, rel=0.3)  # E[(5 z)^2] = 25
    assert all(b < a for a, b in zip(l1, l1[1:], strict=False))
    assert l1[-1] > 0.05 * l1[0]  # lr 1e1: steady but slow decrease
    assert l2[-1] < 1e-10 * l2[0]  # lr 1e2: near zero within 10 steps
    assert all(b > a for a, b in zip(l3, l3[1:], strict=False)) and l3[-1] > 1e15  # lr 1e3: blows up


def test_toy_is_seeded():
    assert experiments.sgd_toy(1e1, seed=5) == experiments.sgd_toy(1e1, seed=5)
    assert experiments.sgd_toy(1e1, seed=5) != experiments.sgd_toy(1e1, seed=6)


def test_cli_prints_losses_per_step(capsys):
    experiments.main(["sgd-toy"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["step", "lr=10", "lr=100", "lr=1000"]
    rows = [line.split() for line in lines[1:11]]
    assert [r[0] for r in rows] == [str(t) for t in range(10)]
    printed = [[float(v) for v in r[1:]] for r in rows]
    expected = [experiments.sgd_toy(lr) for lr in (1e1, 1e2, 1e3)]
    for t in range(10):
        for j in range(3):
            assert printed[t][j] == pytest.approx(expected[j][t], rel=1e-3)
    assert lines[-1].startswith("summary:") and "lr=1000 diverges" in lines[-1]


def test_cli_options_and_errors(capsys):
    experiments.main(["sgd-toy", "--lrs", "1,2", "--steps", "3", "--seed", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["step", "lr=1", "lr=2"] and len(lines) == 1 + 3 + 1
    for bad in (["sgd-toy", "--lrs", "abc"], ["sgd-toy", "--steps", "0"], ["sgd-toy", "--lrs", "-1"]):
        with pytest.raises(SystemExit) as exc:
            experiments.main(bad)
        assert exc.value.code == 2
        assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("args, fragment", [
    (["--seed", str(10**20)], "expected an integer in [0, 2**63)"),  # manual_seed's OverflowError
    (["--seed", "-1"], "expected an integer in [0, 2**63)"),
    (["--lrs", "1e300"], "a learning rate must be at most 3.403e+38"),  # alpha overflowed float32
    (["--lrs", "1,1.0"], "listed twice"),  # printed one column for the two
])
def test_cli_refuses_seeds_and_lrs_the_toy_cannot_use(capsys, args, fragment):
    with pytest.raises(SystemExit) as exc:
        experiments.main(["sgd-toy", "--steps", "2", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


# ---- named experiments (training replaced by a fake; the sweep itself is tested in test_sweep) --

@pytest.fixture
def fake_train(monkeypatch):
    from cs336 import train

    calls = []

    def fake_run(cfg, *, resume=False):
        calls.append(cfg)
        return {"run_dir": cfg.train.out_dir, "steps": cfg.train.max_steps, "final_train_loss": 3.0,
                "final_val_loss": 3.1, "best_val_loss": 3.1, "tokens_per_s": 1.0, "wallclock_s": 1.0}

    monkeypatch.setattr(train, "run", fake_run)
    # Data preparation is cs336.prepare's job (its sharing is tested in test_sweep); skipped here.
    monkeypatch.setattr(experiments.sweep, "share_data", lambda planned, out: list(planned))
    return calls


def test_list_names_every_experiment(capsys):
    experiments.main(["list"])
    text = capsys.readouterr().out
    for name in experiments.EXPERIMENTS:
        assert f"{name}: " in text
    assert "model.ffn_type=silu__model.d_ff=288" in text  # 1.5 x the SCALE d_ff of 192


def test_ffn_experiment_matches_parameter_counts(tmp_path, fake_train, capsys):
    from cs336.model import TransformerLM

    experiments.main(["run", "ffn", "--out-dir", str(tmp_path / "ffn"), "--set", "train.max_steps=7"])
    assert "2 runs, 0 diverged" in capsys.readouterr().out
    swiglu, silu = fake_train
    assert (swiglu.model.ffn_type, silu.model.ffn_type) == ("swiglu", "silu")
    counts = [sum(p.numel() for p in TransformerLM.from_config(c.model).parameters()) for c in fake_train]
    assert counts[0] == counts[1]
    for cfg in fake_train:
        assert cfg.train.max_steps == 7  # --set applies after the experiment's scale settings
        assert cfg.train.sample_tokens == 0 and Path(cfg.train.out_dir).parent == tmp_path / "ffn"
    assert (tmp_path / "ffn" / "summary.md").is_file()


def test_norm_experiment_points(tmp_path, fake_train):
    status = experiments.run_experiment("norm", presets.default_config(), [], tmp_path / "n")
    assert status == 0
    assert [(c.model.use_post_norm, c.model.remove_rmsnorm) for c in fake_train] == [
        (False, False), (True, False), (False, True)]


def test_run_rejects_bad_set_and_used_out(tmp_path, fake_train, capsys):
    with pytest.raises(SystemExit) as exc:
        experiments.main(["run", "lr", "--out-dir", str(tmp_path / "a"), "--set", "optim.nope=1"])
    assert exc.value.code == 2 and "nope" in capsys.readouterr().err
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "summary.json").write_text("{}")
    with pytest.raises(SystemExit) as exc:
        experiments.main(["run", "rope", "--out-dir", str(tmp_path / "b")])
    assert exc.value.code == 2 and "already holds files" in capsys.readouterr().err
    assert not fake_train


def test_run_grid_replaces_the_points(tmp_path, fake_train):
    experiments.main(["run", "lr", "--grid", "optim.lr=3,10", "--out-dir", str(tmp_path / "hi")])
    assert [c.optim.lr for c in fake_train] == [3.0, 10.0]
    assert all(c.model.d_model == 64 for c in fake_train)  # still at the experiments' scale
