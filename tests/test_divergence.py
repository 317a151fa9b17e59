"""cs336.divergence: the per-step check on the loss and the gradient norm."""

import math

import pytest
import torch

from cs336.checkpoint import save_checkpoint
from cs336.divergence import Diverged, DivergenceGuard
from cs336.model import TransformerLM


def test_loss_spike_is_caught_before_nan_and_names_the_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = TransformerLM(vocab_size=40, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=24,
                          rope_theta=10_000.0, kernels="torch")
    ckpts = tmp_path / "checkpoints"
    save_checkpoint(model, None, 10, ckpts / "step_000010.pt")
    with torch.no_grad():
        model.lm_head.weight.mul_(1e5)  # an exploded state saved by something else
    torch.save({"model": model.state_dict(), "iteration": 20}, ckpts / "step_000020.pt")
    guard = DivergenceGuard(checkpoints_dir=ckpts, warmup_steps=5)
    losses = [4.0 - 0.01 * i for i in range(30)]
    for step, loss in enumerate(losses, 1):
        guard.check(step, loss, grad_norm=1.0)
    guard.check(31, 7.0, 2.0)  # noisy but under 3x
    with pytest.raises(Diverged) as info:
        guard.check(32, 40.0, grad_norm=5.0)
    message = str(info.value)
    assert "step 32" in message and "running mean" in message
    assert str(ckpts / "step_000010.pt") in message  # step 20 holds weights far beyond 1e4


@pytest.mark.parametrize("loss, grad, pattern", [(math.nan, 1.0, "loss is nan"),
                                                 (2.0, math.inf, "gradient norm is inf"),
                                                  (2.0, 500.0, "exceeds the limit 100")])
def test_non_finite_values_and_grad_limit(loss, grad, pattern):
    guard = DivergenceGuard(max_grad_norm=100.0)
    guard.check(1, 3.0, 1.0)
    with pytest.raises(Diverged, match=pattern):
        guard.check(2, loss, grad)
    with pytest.raises(Diverged, match="No checkpoint was written yet"):
        DivergenceGuard().check(1, math.nan)


def test_early_spikes_during_warmup_do_not_fire():
    guard = DivergenceGuard(warmup_steps=10)
    for step, loss in enumerate([10.0, 9.0, 30.0, 8.0, 7.5], 1):
        guard.check(step, loss)
    with pytest.raises(ValueError, match="spike_factor"):
        DivergenceGuard(spike_factor=0.5)


def test_the_advice_never_says_resume_when_there_is_no_checkpoint(tmp_path):
    """'No good checkpoint exists yet. Resume from it ...' told the user to resume from nothing (and
    --resume then refuses a run without a checkpoint): without one, the advice is to run the same
    command again, which the run directory accepts while it holds no checkpoint."""
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    with pytest.raises(Diverged) as info:
        DivergenceGuard(checkpoints_dir=ckpts).check(1, math.nan)
    message = str(info.value)
    assert "Resume" not in message and "resume from" not in message
    assert f"run the same command --out-dir {tmp_path / 'run'} again (without --resume)" in message
    assert "lower --optim.lr" in message
    (ckpts / "step_000004.pt").write_bytes(b"damaged")  # checkpoints, none of them good
    with pytest.raises(Diverged, match="start a new run in another --out-dir"):
        DivergenceGuard(checkpoints_dir=ckpts).check(1, math.nan)
    torch.manual_seed(0)
    model = TransformerLM(vocab_size=40, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=24,
                          rope_theta=10_000.0, kernels="torch")
    save_checkpoint(model, None, 8, ckpts / "step_000008.pt")
    with pytest.raises(Diverged) as info:
        DivergenceGuard(checkpoints_dir=ckpts).check(9, math.nan)
    assert f"Last good checkpoint: {ckpts / 'step_000008.pt'}; resume from it (--out-dir {tmp_path / 'run'} " \
           "--resume)" in str(info.value)


def test_the_last_good_checkpoint_is_of_a_step_the_run_has_reached(tmp_path):
    """After a resume from step 10, a step-20 file of the rolled-back continuation is not 'the last
    good checkpoint' of a run diverging at step 15."""
    torch.manual_seed(0)
    model = TransformerLM(vocab_size=40, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=24,
                          rope_theta=10_000.0, kernels="torch")
    ckpts = tmp_path / "checkpoints"
    for step in (10, 20):
        save_checkpoint(model, None, step, ckpts / f"step_{step:06d}.pt")
    with pytest.raises(Diverged) as info:
        DivergenceGuard(checkpoints_dir=ckpts).check(15, math.nan)
    assert f"Last good checkpoint: {ckpts / 'step_000010.pt'}" in str(info.value)
