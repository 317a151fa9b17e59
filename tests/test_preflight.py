"""cs336.preflight: the checks made before any work (paths, tokenizer size, resume conflicts)."""

import pytest

from cs336.config import ConfigError
from cs336.preflight import (
    FlagError,
    check_text_file,
    check_tokenizer_fits,
    config_conflicts,
    existing_file,
    resume_conflicts,
    writable_dir,
)


def test_config_conflicts_lists_changed_leaves_except_allowed():
    saved = {"model": {"d_model": 64, "num_layers": 2}, "train": {"max_steps": 100, "lr": 1e-3},
             "data": {"special_tokens": ["<|endoftext|>"]}}
    requested = {"model": {"d_model": 128, "num_layers": 2}, "train": {"max_steps": 500, "lr": 1e-3},
                 "data": {"special_tokens": ("<|endoftext|>",)}}
    assert config_conflicts(saved, requested, allowed=("train.max_steps",)) == [
        "model.d_model: saved 64, requested 128"]
    assert config_conflicts(saved, saved) == []


def test_tokenizer_larger_than_model_is_refused():
    check_tokenizer_fits(500, 500)
    with pytest.raises(ConfigError, match=r"600 token ids .* 500 embedding rows .* --model\.vocab_size=600"):
        check_tokenizer_fits(600, 500)


def test_path_validation(tmp_path):
    with pytest.raises(FlagError, match="--train-text .* does not exist"):
        existing_file("--train-text", tmp_path / "missing.txt")
    with pytest.raises(FlagError, match="is a directory"):
        existing_file("--train-text", tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(FlagError, match="is a file; pass a directory"):
        writable_dir("--out-dir", tmp_path / "f")
    assert writable_dir("--out-dir", tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(FlagError, match="--train-text .* is empty"):
        check_text_file("--train-text", tmp_path / "empty.txt")
    assert check_text_file("--train-text", tmp_path / "f") == tmp_path / "f"


def test_resume_may_change_optim_fields_but_not_the_optimizer():
    saved = {"model": {"d_model": 32}, "optim": {"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.95]},
             "train": {"max_steps": 10, "seed": 0}}
    changed = {"model": {"d_model": 32}, "optim": {"name": "adamw", "lr": 1e-4, "betas": [0.8, 0.9]},
               "train": {"max_steps": 20, "seed": 0}}
    assert resume_conflicts(saved, changed) == []
    other = {**changed, "optim": {**changed["optim"], "name": "muon"}, "train": {"max_steps": 20, "seed": 1}}
    assert resume_conflicts(saved, other) == ["optim.name: saved 'adamw', requested 'muon'",
                                              "train.seed: saved 0, requested 1"]


def test_read_only_out_dir_is_named_as_such(tmp_path, monkeypatch):
    """preflight.writable_dir: os.access fails on a read-only mount too; the cause is told apart."""
    import os

    from cs336 import preflight

    class ReadOnly:
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(preflight.os, "access", lambda path, mode: False)
    monkeypatch.setattr(preflight.os, "statvfs", lambda path: ReadOnly())
    with pytest.raises(preflight.FlagError, match=r"\(a read-only file system\)"):
        preflight.writable_dir("--out-dir", tmp_path / "run")
    monkeypatch.setattr(preflight.os, "statvfs", lambda path: type("Rw", (), {"f_flag": 0})())
    with pytest.raises(preflight.FlagError, match=r"\(permissions\)"):
        preflight.writable_dir("--out-dir", tmp_path / "run")


@pytest.mark.parametrize("damage, fragment", [
    ("other_model", "written by a model with other settings (d_model: checkpoint 64, model 32)"),
    ("no_optimizer", "holds no optimizer state"),
    ("no_sampler", "has no batch-sampler state"),
])
def test_resume_from_a_checkpoint_that_does_not_fit_is_refused_before_data_work(run_copy, capsys, damage,
                                                                                  fragment):
    """A checkpoint put into the run (another model's, or one without the optimizer or the
    sampler state): refused when --resume opens the run, not after preparing the data again."""
    import shutil

    import torch

    from cs336.checkpoint import save_checkpoint
    from cs336.config_io import apply_overrides
    from cs336.model import TransformerLM
    from cs336.optim import AdamW
    from cs336.run_dir import RunDir
    from run_helpers import cli_error, resume_args

    ckpt = RunDir(run_copy).latest_checkpoint()
    model_cfg = RunDir(run_copy).read_config().model
    if damage == "other_model":
        model_cfg = apply_overrides(RunDir(run_copy).read_config(), ["model.d_model=64"]).model
    model = TransformerLM.from_config(model_cfg)
    extra = {} if damage == "no_sampler" else {"data_rng": torch.Generator().get_state()}
    save_checkpoint(model, None if damage == "no_optimizer" else AdamW(model.parameters()), 8, ckpt, **extra)
    shutil.rmtree(run_copy / "data")
    config = (run_copy / "config.json").read_bytes()
    err = cli_error(capsys, resume_args(run_copy, "--max-steps", "10"))
    assert str(ckpt) in err and fragment in err
    assert not (run_copy / "data").exists()  # no data preparation before the refusal
    assert (run_copy / "config.json").read_bytes() == config


def test_more_threads_than_cpus_is_refused_before_work(tmp_path):
    """--train.threads=100000 reached torch.set_num_threads and the run died in libgomp (a
    segmentation fault) after data preparation; now preflight refuses it naming the flag."""
    from cs336.preflight import preflight, usable_cpus
    from run_helpers import cfg

    cpus = usable_cpus()
    with pytest.raises(FlagError, match=rf"--train.threads=100000 exceeds the {cpus} CPUs .* at most {cpus}"):
        preflight(cfg(tmp_path / "run", "train.threads=100000"))
    preflight(cfg(tmp_path / "run", f"train.threads={cpus}"))
    assert not (tmp_path / "run").exists()  # preflight writes nothing


def test_a_device_or_pipe_is_not_called_missing(tmp_path):
    """--train-text /dev/zero (or a FIFO) was refused as 'does not exist; check the path'."""
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in ("/dev/zero", fifo):
        with pytest.raises(FlagError, match=r"is not a regular file \(a device, pipe or socket"):
            check_text_file("--train-text", path)
    with pytest.raises(FlagError, match="does not exist"):
        check_text_file("--train-text", tmp_path / "missing.txt")
