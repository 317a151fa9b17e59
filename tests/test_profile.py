"""cs336.profile: traces that parse, a top-ops table, the schedule, and errors."""

import json
import subprocess
import sys

import pytest
import torch

from cs336 import profile
from cs336.config import ConfigError

TINY = ["--model.d_model=32", "--model.num_heads=2", "--model.num_layers=1", "--model.d_ff=64",
        "--model.vocab_size=300", "--context-length", "16", "--batch-size", "2"]


def test_cli_writes_trace_and_table(tmp_path, capsys):
    out = tmp_path / "run"
    # The row limit covers every op group, so which ops make the table does not hang on timings.
    profile.main([*TINY, "--kernels", "torch", "--device", "cpu", "--out-dir", str(out), "--row-limit", "100000"])
    printed = capsys.readouterr().out
    trace = json.loads((out / "step5.json").read_text())  # wait 1 + warmup 1 + active 3
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {"zero_grad", "forward", "backward", "optimizer"} <= names
    assert "aten::mm" in names
    table = (out / "key_averages.txt").read_text()
    assert "aten::mm" in table and "Input Shapes" in table
    assert table.strip() in printed and "step5.json" in printed
    assert not list(out.glob(".*.tmp"))


def test_profile_steps_schedule(tmp_path):
    calls = []
    a = torch.randn(16, 16)

    def step():
        calls.append(1)
        return a @ a

    result = profile.profile_steps(step, tmp_path / "p", wait=1, warmup=1, active=2, row_limit=5)
    assert len(calls) == 4
    assert [p.name for p in result.traces] == ["step4.json"]
    events = json.loads(result.traces[0].read_text())["traceEvents"]
    # Only the two active steps are recorded: two matmuls, not four.
    assert sum(1 for e in events if e.get("name") == "aten::mm") == 2
    assert "aten::mm" in result.table_path.read_text()


def _table_rows(table: str) -> list[str]:
    """The data rows of a key_averages table: the lines between its second and third rules."""
    lines = table.strip().splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("---")]
    return lines[rules[1] + 1:rules[2]]


def test_row_limit_caps_the_table(tmp_path):
    a = torch.randn(16, 16)

    def step():
        return (a @ a).relu().exp().sum() + a.mean()

    full = profile.profile_steps(step, tmp_path / "full", wait=0, warmup=1, active=1, row_limit=100000)
    capped = profile.profile_steps(step, tmp_path / "capped", wait=0, warmup=1, active=1, row_limit=2)
    assert len(_table_rows(full.table)) > 2
    assert len(_table_rows(capped.table)) == 2


def test_step_profiler_is_stepped_by_the_callers_loop(tmp_path):
    """The context-manager form: the loop runs more steps than the window; the profiler stops
    after wait + warmup + active and the later steps are not recorded."""
    a = torch.randn(16, 16)
    with profile.StepProfiler(tmp_path / "p", wait=0, warmup=1, active=1, row_limit=5) as prof:
        for _ in range(5):
            a @ a
            prof.step()
    assert prof.result is not None and [p.name for p in prof.result.traces] == ["step2.json"]
    events = json.loads(prof.result.traces[0].read_text())["traceEvents"]
    assert sum(1 for e in events if e.get("name") == "aten::mm") == 1


def test_profile_steps_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="profile active must be a positive integer"):
        profile.profile_steps(lambda: None, tmp_path, active=0)
    with pytest.raises(ConfigError, match="profile row_limit must be a positive integer"):
        profile.profile_steps(lambda: None, tmp_path, row_limit=0)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="is not a directory"):
        profile.profile_steps(lambda: None, blocker)


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "gpt5"], "invalid choice: 'gpt5'"),
    (["--model.d_model=30", "--model.num_heads=4"], "not divisible"),
    (["--batch-size", "0"], "train.batch_size must be a positive integer"),
    (["--device", "tpu"], "valid choices: auto, cpu, cuda, cuda:N, mps"),
    (["--kernels", "fast"], "model.kernels='fast'; valid choices: auto, torch, native, triton"),
    (["--row-limit", "0"], "--row-limit: expected a positive integer, got '0'"),  # was an empty table
    (["--row-limit", "-5"], "--row-limit: expected a positive integer, got '-5'"),  # was every row
])
def test_cli_bad_input_exits_2(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        profile.main([*args, "--out-dir", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_a_model_beyond_the_device_memory_is_refused_before_it_is_built(tmp_path, capsys, monkeypatch):
    # train refuses it; profile built it anyway (gpt2-large needs 27 GB: a 24 GB machine swapped or
    # the OOM killer ended it). Here the device "has" 1 kB.
    from cs336 import preflight
    from cs336.model import TransformerLM

    monkeypatch.setattr(preflight, "device_memory", lambda device: 1000)
    monkeypatch.setattr(TransformerLM, "from_config", lambda *a, **k: pytest.fail("the model was built"))
    with pytest.raises(SystemExit) as exc:
        profile.main([*TINY, "--kernels", "torch", "--device", "cpu", "--out-dir", str(tmp_path / "p")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "training this model needs about" in err and "lower --model.d_model" in err
    assert not (tmp_path / "p").exists()


def test_help():
    done = subprocess.run([sys.executable, "-m", "cs336.profile", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "--warmup" in done.stdout and "--model.d_model" in done.stdout


@pytest.mark.parametrize("mode", ["none", "bf16"])
def test_the_profiled_step_honours_train_autocast(monkeypatch, mode):
    """The step runs under bf16 autocast exactly when --train.autocast=bf16, as training does
    (the profiler used to force bf16 on CUDA whatever the config said)."""
    from cs336.cli import config_from_args
    from cs336.model import TransformerLM

    seen = []
    real = TransformerLM.loss

    def spy(self, x, y):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return real(self, x, y)

    monkeypatch.setattr(TransformerLM, "loss", spy)
    args = profile.parse_args(profile.build_parser(), [*TINY, "--kernels", "torch", "--device", "cpu",
                                                       f"--train.autocast={mode}"])
    step, _ = profile.make_train_step(config_from_args(args))
    step()
    assert seen == [mode == "bf16"]


def test_the_profiled_step_honours_the_train_loop_flags(monkeypatch):
    """--train.grad_accum_steps, --train.activation_checkpointing, --train.z_loss and clipping were
    silently ignored: the profile showed one full-batch step without them, unlike the run it profiles."""
    from cs336 import nn_utils, parallel
    from cs336.cli import config_from_args
    from cs336.model import TransformerLM

    seen, checkpointed, clipped = [], [], []
    real_loss, real_clip = TransformerLM.loss, nn_utils.clip_gradients
    real_ckpt = parallel.apply_activation_checkpointing

    def loss_spy(self, x, y, **kwargs):
        seen.append((x.shape[0], kwargs.get("z_loss", 0.0)))
        return real_loss(self, x, y, **kwargs)

    monkeypatch.setattr(TransformerLM, "loss", loss_spy)
    monkeypatch.setattr(parallel, "apply_activation_checkpointing",
                        lambda model, mode: checkpointed.append(mode) or real_ckpt(model, mode))
    monkeypatch.setattr(nn_utils, "clip_gradients", lambda params, c: clipped.append(c) or real_clip(params, c))
    tiny = [a if a != "2" else "4" for a in TINY]  # batch 4, in 2 micro-batches of 2 rows
    args = profile.parse_args(profile.build_parser(), [
        *tiny, "--kernels", "torch", "--device", "cpu", "--train.grad_accum_steps=2",
        "--train.activation_checkpointing=full", "--train.z_loss=1e-4", "--optim.grad_clip=0.5"])
    step, _ = profile.make_train_step(config_from_args(args))
    loss = step()
    assert seen == [(2, 1e-4), (2, 1e-4)] and checkpointed == ["full"] and clipped == [0.5]
    assert torch.isfinite(loss)


def test_fsdp_is_refused_in_one_process(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        profile.main([*TINY, "--kernels", "torch", "--device", "cpu", "--train.parallel=fsdp",
                      "--out-dir", str(tmp_path / "p")])
    assert exc.value.code == 2
    assert "--train.parallel=fsdp" in capsys.readouterr().err and not (tmp_path / "p").exists()
