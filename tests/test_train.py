"""cs336.train, the command line: the main job end to end at a tiny size, exact resume, every user
error it refuses (one line, exit 2, nothing written or changed), and ``--kernels triton``."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cs336 import ops
from cs336.config_io import apply_overrides
from cs336.data import save_tokens
from cs336.presets import smoke_config
from cs336.run_dir import RunDir
from cs336.train import build_parser, config_for, main, run
from run_helpers import BASE, assert_same_metrics, cfg, cli_error, resume_args, token_args

TINY = ["train.max_steps=24", "train.eval_interval=12", "train.log_interval=4", "train.checkpoint_interval=8",
        "train.keep_last=2", "data.corpus_mb=0.1", "train.sample_tokens=16"]


def tiny(out_dir, *extra):
    return apply_overrides(smoke_config(), TINY + [f"train.out_dir={out_dir}", *extra])


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_main_job_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    main(["--preset", "smoke", "--out-dir", str(out)] + [f"--{o}" for o in TINY] + ["--optim.lr=1e-2"])
    printed = capsys.readouterr().out
    first = printed.splitlines()[0]
    assert first.startswith(f"config (full: {out / 'config.json'}): ") and len(first) < 400 + len(str(out)), first
    assert "optim.lr=0.01" in first and "train.max_steps=24" in first and "optim.eps=" not in first
    assert f"to continue this run if it stops: python -m cs336.train --out-dir {out} --resume" in printed
    assert "done: 24 steps" in printed and "sample:" in printed
    for name in ("config.json", "metrics.jsonl", "loss.png", "samples.txt", "tokenizer/vocab.json",
                 "tokenizer/merges.txt", "data/train.bin", "data/valid.bin.json", "checkpoints/latest"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["step_000016.pt", "step_000024.pt"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000024.pt"
    assert RunDir(out).read_config() == config_for(build_parser().parse_args(
        ["--preset", "smoke", "--out-dir", str(out)] + [f"--{o}" for o in TINY] + ["--optim.lr=1e-2"]))
    rows = metrics(out)
    assert [r["step"] for r in rows] == [0, 4, 8, 12, 16, 20, 24]
    assert set(rows[-1]) == {"step", "train_loss", "val_loss", "perplexity", "lr", "grad_norm",
                             "tokens_per_s", "wallclock_s"}
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.5, "validation loss did not drop"
    assert rows[-1]["train_loss"] < rows[1]["train_loss"]
    assert rows[-1]["perplexity"] < rows[0]["perplexity"]
    assert "Once upon a time" in (out / "samples.txt").read_text()


def test_run_returns_the_summary_and_links_runs_latest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    older = tmp_path / "runs" / "older"
    older.mkdir(parents=True)
    (tmp_path / "runs" / "latest").symlink_to("older")
    summary = run(tiny(None, "train.max_steps=8", "train.sample_tokens=0", "train.out_dir=none"))
    made = Path(summary["run_dir"])
    assert summary["steps"] == 8 and made.parent == Path("runs") and made.name != "older"
    assert (tmp_path / "runs" / "latest").resolve() == (tmp_path / made).resolve()
    assert summary["final_val_loss"] is not None and summary["best_val_loss"] <= summary["final_val_loss"]
    assert summary["tokens_per_s"] > 0 and summary["wallclock_s"] > 0 and summary["interrupted"] is False
    assert set(summary) >= {"run_dir", "steps", "final_train_loss", "final_val_loss", "best_val_loss",
                            "tokens_per_s", "wallclock_s"}


def test_resume_continues_exactly(tmp_path):
    fixed = ["optim.cosine_cycle_iters=24", "train.sample_tokens=0"]
    full = run(tiny(tmp_path / "full", *fixed))
    run(tiny(tmp_path / "split", *fixed, "train.max_steps=12"))
    resumed = run(tiny(tmp_path / "split", *fixed), resume=True)
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "split")
    assert_same_metrics(a, b)
    assert resumed["final_val_loss"] == pytest.approx(full["final_val_loss"], rel=1e-6)
    assert resumed["steps"] == 24


def test_profile_records_the_first_steps(tmp_path):
    summary = run(tiny(tmp_path / "p", "train.max_steps=6", "train.profile=true", "train.sample_tokens=0"))
    assert summary["steps"] == 6
    prof = tmp_path / "p" / "profile"
    assert (prof / "key_averages.txt").read_text().count("\n") > 5
    assert list(prof.glob("step*.json"))
    assert [r["step"] for r in metrics(tmp_path / "p")] == [0, 4, 6]




def test_help_shows_the_commands_and_generated_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--resume", "--out-dir", "--max-steps", "--kernels", "--optim.lr", "--model.d_model",
                 "--train-text", "--dataset", "--wandb", "--compile"):
        assert flag in out, flag


@pytest.mark.slow
def test_wandb_offline_logs_into_the_run_dir(tmp_path):
    pytest.importorskip("wandb")
    run(tiny(tmp_path / "w", "train.max_steps=4", "train.wandb=true", "train.sample_tokens=0"))
    offline = list((tmp_path / "w" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and any(offline[0].rglob("*.wandb"))


# ------------------------------------------------------------------ user errors

@pytest.mark.parametrize("damage, fragment", [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "truncated or corrupt"),
    (lambda p: p.write_bytes(b"not a checkpoint at all"), "truncated or corrupt"),
    (lambda p: torch.save({"w": torch.zeros(2)}, p), "not a training checkpoint"),
])
def test_damaged_checkpoints_give_one_clear_error(run_copy, capsys, damage, fragment):
    ckpt = run_copy / "checkpoints" / "step_000008.pt"
    damage(ckpt)
    err = cli_error(capsys, resume_args(run_copy, "--max-steps", "10"))
    assert fragment in err and str(ckpt) in err

def test_resume_with_a_conflicting_model_flag_is_refused_before_writing(run_copy, capsys):
    config = (run_copy / "config.json").read_bytes()
    err = cli_error(capsys, resume_args(run_copy, "--max-steps", "10", "--model.d_model=64"))
    assert "differ from" in err and "model.d_model: saved 32, requested 64" in err
    assert (run_copy / "config.json").read_bytes() == config

def test_resume_and_restart_guards(run_copy, tmp_path, capsys):
    err = cli_error(capsys, ["--preset", "smoke", "--out-dir", str(run_copy), "--train.progress=false"])
    assert "already holds checkpoints" in err and "--resume" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    err = cli_error(capsys, ["--out-dir", str(empty), "--resume"])
    assert "config.json" in err
    (run_copy / "checkpoints" / "latest").write_text("step_999999.pt\n")
    err = cli_error(capsys, resume_args(run_copy))
    assert "latest" in err and "step_999999.pt" in err

def test_flipped_bytes_are_refused_on_resume_naming_the_previous_checkpoint(run_copy, capsys):
    ckpt = run_copy / "checkpoints" / "step_000008.pt"
    data = bytearray(ckpt.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + 400):
        data[i] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    config = (run_copy / "config.json").read_bytes()
    err = cli_error(capsys, resume_args(run_copy, "--max-steps", "10"))
    assert str(ckpt) in err and "step_000004.pt" in err
    assert "training a" not in capsys.readouterr().out  # refused before any data work
    assert (run_copy / "config.json").read_bytes() == config

def test_ordinary_non_empty_directory_is_refused_and_untouched(tmp_path, capsys):
    docs = tmp_path / "Documents"
    docs.mkdir()
    (docs / "config.json").write_text('{"mine": true}\n')
    (docs / "metrics.jsonl").write_text("my notes\n")
    before = {p.name: p.read_bytes() for p in docs.iterdir()}
    err = cli_error(capsys, ["--preset", "smoke", "--out-dir", str(docs), "--train.progress=false"])
    assert "is not a run directory" in err and "pass a new or empty directory" in err
    assert {p.name: p.read_bytes() for p in docs.iterdir()} == before

def test_runs_without_out_dir_get_distinct_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = run(cfg(None, "train.max_steps=1", "train.eval_interval=1", "train.checkpoint_interval=1"))
    b = run(cfg(None, "train.max_steps=1", "train.eval_interval=1", "train.checkpoint_interval=1"))
    assert a["run_dir"] != b["run_dir"]
    assert all((tmp_path / s["run_dir"] / ".cs336-run").is_file() for s in (a, b))

def test_empty_token_file(base_run, tmp_path, capsys):
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    err = cli_error(capsys, token_args(base_run, empty, base_run / "data" / "valid.bin", tmp_path / "o"))
    assert str(empty) in err and "empty" in err

def test_token_file_with_wrong_dtype(base_run, tmp_path, capsys):
    tokens = np.fromfile(base_run / "data" / "train.bin", dtype=np.uint16)
    wide = tmp_path / "wide.bin"
    tokens.astype(np.uint32).tofile(wide)  # raw uint32 without a sidecar: read as uint16 by default
    (tmp_path / "wide.bin.json").write_text(json.dumps({"dtype": "uint16", "count": int(tokens.size)}))
    err = cli_error(capsys, token_args(base_run, wide, base_run / "data" / "valid.bin", tmp_path / "o"))
    assert str(wide) in err and "truncated or was overwritten" in err

def test_token_ids_beyond_the_vocabulary(base_run, tmp_path, capsys):
    foreign = tmp_path / "foreign.bin"
    save_tokens(foreign, np.arange(1000, 2000))
    err = cli_error(capsys, token_args(base_run, foreign, base_run / "data" / "valid.bin", tmp_path / "o"))
    assert str(foreign) in err and "another tokenizer" in err

def test_token_file_shorter_than_one_window(base_run, tmp_path, capsys):
    short = tmp_path / "short.bin"
    save_tokens(short, np.arange(10))
    err = cli_error(capsys, token_args(base_run, short, base_run / "data" / "valid.bin", tmp_path / "o"))
    assert str(short) in err and "context_length" in err

def test_context_longer_than_the_model(capsys, tmp_path):
    err = cli_error(capsys, ["--preset", "smoke", "--out-dir", str(tmp_path / "o"), "--train.context_length=64"])
    assert "train.context_length=64 exceeds model.context_length=32" in err

def test_missing_text_files(capsys, tmp_path):
    err = cli_error(capsys, ["--out-dir", str(tmp_path / "o"), "--train-text", str(tmp_path / "nope.txt"),
                             "--valid-text", str(tmp_path / "nope2.txt")])
    assert "--train-text" in err and "nope.txt" in err

def test_text_that_is_not_utf8(capsys, tmp_path):
    train, valid = tmp_path / "train.txt", tmp_path / "valid.txt"
    train.write_bytes(b"a fine start " * 50 + b"\xff\xfe broken " * 5)
    valid.write_text("fine text " * 50)
    err = cli_error(capsys, ["--preset", "smoke", "--out-dir", str(tmp_path / "o"), "--train.progress=false",
                             "--train-text", str(train), "--valid-text", str(valid)])
    assert str(train) in err and "UTF-8" in err

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when no CUDA device exists")
def test_triton_kernels_without_a_gpu(base_run, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    err = cli_error(capsys, token_args(base_run, base_run / "data" / "train.bin", base_run / "data" / "valid.bin",
                                        tmp_path / "o") + ["--kernels", "triton"])
    assert "--kernels triton needs a CUDA device" in err
    assert not (tmp_path / "o").exists(), "the backend check must come before any file is written"

def test_unknown_flag_names_the_closest_valid_ones(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--model.d_modle=64"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--model.d_modle=64" in err and "--model.d_model" in err

@pytest.mark.parametrize("flag, fragment", [
    ("--optim.lr=nan", "--optim.lr='nan' is not a finite number"),
    ("--optim.lr=inf", "--optim.lr='inf' is not a finite number"),
    ("--optim.betas=0.9,inf", "--optim.betas='inf' is not a finite number"),
    ("--max-steps=1e30", "does not fit a 64-bit integer"),
    ("--model.d_model=99999999999999999999999", "does not fit a 64-bit integer"),
    ("--train.sample_temperature=-inf", "not a finite number"),
])
def test_non_finite_or_oversized_flags_are_refused(flag, fragment, tmp_path, capsys):
    err = cli_error(capsys, ["--preset", "smoke", "--out-dir", str(tmp_path / "run"), flag])
    assert fragment in err
    assert not (tmp_path / "run").exists()

def test_config_file_that_is_not_text_is_refused(tmp_path, capsys):
    binary = tmp_path / "conf.json"
    binary.write_bytes(b"PK\x03\x04\x00\x00binary")
    err = cli_error(capsys, ["--config", str(binary), "--out-dir", str(tmp_path / "run")])
    assert "not a text config file" in err and str(binary) in err
    latin = tmp_path / "latin.toml"
    latin.write_bytes("[optim]\nlr = 1e-3 # caf\xe9\n".encode("latin-1"))
    err = cli_error(capsys, ["--config", str(latin), "--out-dir", str(tmp_path / "run")])
    assert "not UTF-8 text" in err

def test_empty_sample_prompt_fails_before_any_work(tmp_path, capsys):
    err = cli_error(capsys, ["--preset", "smoke", "--out-dir", str(tmp_path / "run"), "--train.sample_prompt="])
    assert "train.sample_prompt is empty" in err
    assert not (tmp_path / "run").exists()

def test_tokenizer_dir_larger_than_the_model_fails_before_any_work(base_run, tmp_path, capsys):
    out = tmp_path / "run"
    err = cli_error(capsys, ["--preset", "smoke", "--out-dir", str(out), "--model.vocab_size=300",
                             f"--data.tokenizer_dir={base_run / 'tokenizer'}", "--train.progress=false"])
    assert "has 320 token ids but the model has 300 embedding rows" in err
    assert "--model.vocab_size=320" in err
    assert not out.exists()

def test_missing_or_empty_input_paths_fail_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    valid = tmp_path / "valid.txt"
    valid.write_text("some text\n")
    err = cli_error(capsys, ["--preset", "smoke", "--out-dir", str(out), "--train-text", str(tmp_path / "nope.txt"),
                             "--valid-text", str(valid)])
    assert f"--train-text {tmp_path / 'nope.txt'} does not exist" in err
    (tmp_path / "empty.txt").write_text("")
    err = cli_error(capsys, ["--preset", "smoke", "--out-dir", str(out), "--train-text", str(tmp_path / "empty.txt"),
                             "--valid-text", str(valid)])
    assert "is empty" in err
    err = cli_error(capsys, ["--preset", "smoke", "--out-dir", str(out), f"--data.tokenizer_dir={tmp_path}"])
    assert "vocab.json" in err and "does not exist" in err
    assert not out.exists()

def test_model_too_large_for_the_device_fails_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    err = cli_error(capsys, ["--preset", "smoke", "--out-dir", str(out), "--device", "cpu",
                             "--model.d_model=131072", "--model.d_ff=131072", "--model.num_heads=2"])
    assert "training this model needs about" in err and "lower --model.d_model" in err
    assert not out.exists()


@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk(pattern)``: atomic writes of files whose name contains ``pattern`` go to
    /dev/full, so the kernel answers ENOSPC (no root needed); everything else is written."""
    import cs336.fileio as fileio

    if not Path("/dev/full").is_char_device():
        pytest.skip("no /dev/full character device here")
    real = fileio.temp_beside

    def arm(pattern):
        def temp_beside(path, suffix=".tmp"):
            fd, tmp = real(path, suffix)
            if pattern in os.fspath(path):
                os.close(fd)
                fd = os.open("/dev/full", os.O_WRONLY)
            return fd, tmp
        monkeypatch.setattr(fileio, "temp_beside", temp_beside)
        import cs336.tokenizer.encode_file as encode_file
        monkeypatch.setattr(encode_file, "temp_beside", temp_beside)

    return arm


@pytest.mark.parametrize("pattern, what", [("step_", "checkpoint"), ("train.bin", "token file"),
                                           ("vocab.json", "tokenizer")])
def test_disk_full_is_one_line_exit_2_and_leaves_no_partial_file(tmp_path, capsys, full_disk, pattern, what):
    full_disk(pattern)
    out = tmp_path / "run"
    err = cli_error(capsys, ["--preset", "smoke", "--out-dir", str(out), "--train.progress=false",
                             *[f"--{o}" for o in BASE]])
    assert err.count("\n") == 1, err
    assert f"{pattern}" in err and "No space left on device; free space" in err, (what, err)
    leftovers = [p for p in out.rglob("*") if p.name.endswith((".tmp", ".part"))]
    assert leftovers == []

# ------------------------------------------------------------------ --kernels triton
# The main job trains through FlashAttention (the interpreter on a CPU): the attention launchers
# run forward and backward, and the loss is finite and falls.

# Every kernel runs in Triton's interpreter (seconds per step at batch 8), hence 2 x 32 tokens.
FLASH_STEPS = 8
FLASH_FLAGS = [f"--train.max_steps={FLASH_STEPS}", f"--train.eval_interval={FLASH_STEPS}",
               "--train.log_interval=1", "--train.eval_batches=1", f"--train.checkpoint_interval={FLASH_STEPS}",
               "--train.batch_size=2", "--data.corpus_mb=0.05", "--train.sample_tokens=0", "--optim.lr=3e-2",
               "--optim.warmup_iters=1", "--optim.cosine_cycle_iters=1000"]


@pytest.mark.skipif(not ops.backend_available("triton"),
                    reason="Triton kernels cannot run here (no CUDA and no TRITON_INTERPRET)")
def test_training_with_triton_kernels_uses_flash_attention(tmp_path, monkeypatch, capsys):
    from kernels import attention

    calls = {"fwd": 0, "bwd": 0}
    real_fwd, real_bwd = attention.flash_attention_fwd, attention.flash_attention_bwd

    def fwd(*args):
        calls["fwd"] += 1
        return real_fwd(*args)

    def bwd(*args):
        calls["bwd"] += 1
        return real_bwd(*args)

    monkeypatch.setattr(attention, "flash_attention_fwd", fwd)
    monkeypatch.setattr(attention, "flash_attention_bwd", bwd)
    out = tmp_path / "run"
    main(["--preset", "smoke", "--out-dir", str(out), "--kernels", "triton", *FLASH_FLAGS])
    assert f"done: {FLASH_STEPS} steps" in capsys.readouterr().out
    layers = json.loads((out / "config.json").read_text())["model"]["num_layers"]
    # One forward per layer per training step (plus evaluation's), one backward per layer per step.
    assert calls["bwd"] == FLASH_STEPS * layers
    assert calls["fwd"] > calls["bwd"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    assert len(losses) == FLASH_STEPS and all(math.isfinite(x) for x in losses)
    # Falling: the mean of the last three steps 0.5 below the first (measured: ~1.0 below).
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses
    assert math.isfinite(rows[-1]["val_loss"])

def test_resume_with_max_steps_below_the_checkpoint_is_refused_before_writing(run_copy, capsys):
    config = (run_copy / "config.json").read_bytes()
    metrics_before = (run_copy / "metrics.jsonl").read_bytes()
    err = cli_error(capsys, resume_args(run_copy, "--max-steps", "5"))
    assert "step_000008.pt is at step 8" in err and "--max-steps of at least 8" in err
    assert (run_copy / "config.json").read_bytes() == config  # not rewritten with max_steps=5
    assert (run_copy / "metrics.jsonl").read_bytes() == metrics_before
    assert not (run_copy / "samples.txt").exists()
