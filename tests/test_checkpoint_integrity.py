"""cs336.checkpoint_integrity: a changed byte is caught on load and names the checkpoint to fall back to;
non-finite weights are never saved; the last good checkpoint is the newest intact, finite one."""

import zipfile

import numpy as np
import pytest
import torch

from cs336.checkpoint import (
    CheckpointError,
    NonFiniteWeightsError,
    check_weights,
    last_good_checkpoint,
    load_checkpoint,
    previous_good_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from cs336.model import TransformerLM
from cs336.optim import AdamW

TINY = dict(vocab_size=40, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=24,
            rope_theta=10_000.0, kernels="torch")


def _setup(seed=0):
    torch.manual_seed(seed)
    model = TransformerLM(**TINY)
    return model, AdamW(model.parameters(), lr=1e-2)


def _run_dir(tmp_path, steps=(100, 200, 300)):
    model, opt = _setup()
    ckpts = tmp_path / "checkpoints"
    for step in steps:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        save_checkpoint(model, opt, step, ckpts / f"step_{step:06d}.pt")
    return model, opt, ckpts


def _flip_tensor_bytes(path, count, seed=0):
    """Flip ``count`` bytes inside the stored tensor data (where torch's reader checks nothing)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        spans = []
        for info in zf.infolist():
            if "/data/" in info.filename and info.file_size >= 64:
                header = data[info.header_offset:info.header_offset + 30]
                name_len = int.from_bytes(header[26:28], "little")
                extra_len = int.from_bytes(header[28:30], "little")
                start = info.header_offset + 30 + name_len + extra_len
                spans.extend(range(start, start + info.file_size))
    rng = np.random.default_rng(seed)
    for pos in rng.choice(spans, size=count, replace=False):
        data[pos] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_tensor_bytes_are_caught_and_name_the_previous_checkpoint(tmp_path):
    model, opt, ckpts = _run_dir(tmp_path)
    newest = ckpts / "step_000300.pt"
    _flip_tensor_bytes(newest, 400)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(newest, _setup()[0], None)
    message = str(info.value)
    assert str(newest) in message and "SHA-256" in message
    assert str(ckpts / "step_000200.pt") in message
    # The named fallback loads, and holds what was saved at step 200.
    assert load_checkpoint(ckpts / "step_000200.pt", _setup()[0], None) == 200


def test_random_byte_flips_anywhere_never_load_silently(tmp_path):
    model, opt, ckpts = _run_dir(tmp_path, steps=(1, 2))
    newest = ckpts / "step_000002.pt"
    clean = newest.read_bytes()
    for seed in range(5):
        data = bytearray(clean)
        for pos in np.random.default_rng(seed).choice(len(data), size=400, replace=False):
            data[pos] ^= 0xFF
        newest.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match="step_000001.pt"):
            load_checkpoint(newest, _setup()[0], None)


def test_no_fallback_when_the_only_checkpoint_is_corrupt(tmp_path):
    _, _, ckpts = _run_dir(tmp_path, steps=(5,))
    only = ckpts / "step_000005.pt"
    _flip_tensor_bytes(only, 10)
    with pytest.raises(CheckpointError, match="No earlier valid checkpoint"):
        load_checkpoint(only, _setup()[0], None)
    assert previous_good_checkpoint(only) is None and last_good_checkpoint(ckpts) is None


def test_checksum_survives_a_clean_round_trip_and_old_files_still_load(tmp_path):
    model, opt = _setup()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(model, opt, 7, path)
    payload = verify_checkpoint(path)
    assert len(payload["checksum"]["sha256"]) == 64
    payload.pop("checksum")  # a file from before checksums (or another implementation)
    torch.save(payload, path)
    assert load_checkpoint(path, _setup(1)[0], None) == 7


def test_non_finite_weights_are_never_saved(tmp_path):
    model, opt = _setup()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(model, opt, 1, path)
    before = path.read_bytes()
    with torch.no_grad():
        model.layers[0].ffn.w2.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"layers\.0\.ffn\.w2\.weight"):
        save_checkpoint(model, opt, 2, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_check_weights_bounds_exploding_weights():
    model, _ = _setup()
    check_weights(model, max_abs=1e3)
    with torch.no_grad():
        model.ln_final.weight[3] = 1e7
    check_weights(model)  # finite: only the NaN/inf rule applies
    with pytest.raises(NonFiniteWeightsError, match=r"ln_final\.weight \(max \|w\| 1e\+07\)"):
        check_weights(model, max_abs=1e3)


def test_last_good_checkpoint_skips_corrupt_and_non_finite_files(tmp_path):
    model, opt, ckpts = _run_dir(tmp_path)
    _flip_tensor_bytes(ckpts / "step_000300.pt", 50)
    # A non-finite file written by something else than save_checkpoint (which refuses them).
    payload = torch.load(ckpts / "step_000200.pt", weights_only=True)
    payload["model"]["ln_final.weight"][0] = float("inf")
    payload.pop("checksum")
    torch.save(payload, ckpts / "step_000200.pt")
    assert last_good_checkpoint(ckpts) == ckpts / "step_000100.pt"
    assert previous_good_checkpoint(ckpts / "step_000300.pt") == ckpts / "step_000100.pt"


@pytest.mark.parametrize("entry, value, fragment", [
    ("iteration", "abc", "'iteration' is 'abc'"),
    ("iteration", -3, "'iteration' is -3"),
    ("iteration", 2.5, "'iteration' is 2.5"),
    ("model_config", "junk", "'model_config' is of type str"),
    ("optimizer", "junk", "'optimizer' is of type str"),
    ("optimizer", {"lr": 1.0}, "not an optimizer state dict"),
    ("extra", [1, 2], "'extra' is of type list"),
    ("rng", 7, "'rng' is of type int"),
])
def test_foreign_entries_of_the_wrong_type_are_one_clear_error(tmp_path, entry, value, fragment):
    """A dict with 'model' and 'iteration' from another program whose entries have other types:
    refused on read, before load_checkpoint indexes them (a ValueError, TypeError or
    AttributeError from the loader's insides before)."""
    model, opt = _setup()
    payload = {"model": model.state_dict(), "iteration": 1, entry: value}
    path = tmp_path / "foreign.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="foreign.pt is not a training checkpoint of this format") as exc:
        load_checkpoint(path, model, opt)
    assert fragment in str(exc.value)


def test_an_integer_tensor_iteration_of_another_implementation_loads(tmp_path):
    model, _ = _setup()
    path = tmp_path / "other.pt"
    torch.save({"model": model.state_dict(), "iteration": torch.tensor(12)}, path)
    assert load_checkpoint(path, model, None) == 12



def test_a_rolled_back_run_is_told_how_to_resume_from_the_previous_checkpoint(tmp_path):
    """'The previous valid checkpoint is X: load that one (or resume from it)' named no way to
    resume from X (--resume loads what checkpoints/latest names); in a run's checkpoints/ it now says
    to write X's name into latest. last_good_checkpoint(max_step=) skips the later files of a
    continuation that the resume rolled back."""
    model, opt, ckpts = _run_dir(tmp_path)
    (ckpts / "latest").write_text("step_000300.pt\n")
    _flip_tensor_bytes(ckpts / "step_000300.pt", 50)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(ckpts / "step_000300.pt", model, opt)
    assert f"to resume from it, write step_000200.pt into {ckpts / 'latest'} and pass --resume" in str(exc.value)
    assert last_good_checkpoint(ckpts) == ckpts / "step_000200.pt"
    assert last_good_checkpoint(ckpts, max_step=150) == ckpts / "step_000100.pt"
    assert last_good_checkpoint(ckpts, max_step=99) is None
