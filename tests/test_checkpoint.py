"""cs336.checkpoint: exact resume (weights, optimizer, RNG), atomic writes, and clear errors."""

import io
import random

import numpy as np
import pytest
import torch

from cs336.checkpoint import CheckpointError, load_checkpoint, load_checkpoint_full, restore_rng_state, save_checkpoint
from cs336.data import get_batch
from cs336.model import TransformerLM
from cs336.optim import AdamW

TINY = dict(vocab_size=40, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=24,
            rope_theta=10_000.0, kernels="torch")
DATA = np.random.default_rng(0).integers(0, 40, size=2000).astype(np.uint16)


def _setup(seed=0, **overrides):
    torch.manual_seed(seed)
    model = TransformerLM(**{**TINY, **overrides})
    return model, AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _train_step(model, opt):
    """One step whose batch (torch RNG) and loss weight (numpy + Python RNG) depend on all RNGs."""
    x, y = get_batch(DATA, 4, 8, "cpu")
    scale = 1.0 + 0.1 * np.random.rand() + 0.1 * random.random()
    opt.zero_grad()
    loss = model.loss(x, y) * scale
    loss.backward()
    opt.step()
    return loss.item()


def _seed_all(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def test_resume_gives_identical_next_losses(tmp_path):
    model, opt = _setup()
    _seed_all(123)
    for _ in range(5):
        _train_step(model, opt)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(model, opt, 5, path, data_position=1234)
    expected = [_train_step(model, opt) for _ in range(5)]

    # A differently initialised model, optimizer and RNG state: everything must come from the file.
    model2, opt2 = _setup(seed=99)
    _seed_all(7)
    state = load_checkpoint_full(path, model2, opt2)
    restore_rng_state(state)
    assert state["iteration"] == 5 and state["extra"] == {"data_position": 1234}
    assert state["model_config"]["d_model"] == 16
    resumed = [_train_step(model2, opt2) for _ in range(5)]
    assert resumed == expected
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_load_checkpoint_adapter_and_file_objects():
    model, opt = _setup()
    _train_step(model, opt)
    buf = io.BytesIO()
    save_checkpoint(model, opt, 17, buf)
    buf.seek(0)
    model2, opt2 = _setup(seed=1)
    assert load_checkpoint(buf, model2, opt2) == 17
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    p0 = next(iter(opt.state))
    q0 = next(iter(opt2.state))
    assert opt2.state[q0]["step"] == opt.state[p0]["step"] == 1
    assert torch.equal(opt2.state[q0]["exp_avg"], opt.state[p0]["exp_avg"])


def test_checkpoint_is_weights_only_loadable(tmp_path):
    model, opt = _setup()
    _train_step(model, opt)
    save_checkpoint(model, opt, 1, tmp_path / "c.pt", note="x", position=[1, 2.5, None])
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert raw["format"] == "cs336-checkpoint" and raw["iteration"] == 1
    assert set(raw["rng"]) == {"torch", "cuda", "numpy", "python"}


def test_unserializable_extra_is_refused_before_writing(tmp_path):
    model, opt = _setup()
    with pytest.raises(TypeError, match=r"extra\['bad'\].*numpy"):
        save_checkpoint(model, opt, 1, tmp_path / "c.pt", bad=np.float64(1.0))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("iteration", [2.7, -5, "3", True, None])
def test_an_iteration_that_is_not_a_step_count_is_refused_before_writing(tmp_path, iteration):
    """save_checkpoint(model, opt, 2.7, out) wrote iteration 2 (int() truncated it), -5 was stored as
    is, and the string '3' became 3: a resume then continued from a step that never happened."""
    model, opt = _setup()
    with pytest.raises(TypeError, match="iteration must be an integer >= 0"):
        save_checkpoint(model, opt, iteration, tmp_path / "c.pt")
    assert not any(tmp_path.iterdir())
    save_checkpoint(model, opt, np.int64(7), tmp_path / "c.pt")  # numpy and 0-d tensor ints are integers
    assert load_checkpoint(tmp_path / "c.pt", model, opt) == 7


def test_failing_save_leaves_old_file_intact(tmp_path, monkeypatch):
    model, opt = _setup()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(model, opt, 1, path)
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial data")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    _train_step(model, opt)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(model, opt, 2, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left
    assert load_checkpoint(path, _setup()[0], None) == 1


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_checkpoint_is_a_clear_error(tmp_path, damage):
    model, opt = _setup()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(model, opt, 3, path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    else:
        path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"ckpt\.pt is truncated or corrupt"):
        load_checkpoint(path, model, opt)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pt does not exist"):
        load_checkpoint(tmp_path / "nope.pt", _setup()[0], None)


def test_foreign_files_are_rejected(tmp_path):
    model, _ = _setup()
    bare = tmp_path / "bare.pt"
    torch.save(model.state_dict(), bare)
    with pytest.raises(CheckpointError, match=r"bare\.pt is not a training checkpoint.*bare state dict"):
        load_checkpoint(bare, model, None)
    listing = tmp_path / "list.pt"
    torch.save([1, 2, 3], listing)
    with pytest.raises(CheckpointError, match=r"list\.pt is not a training checkpoint"):
        load_checkpoint(listing, model, None)
    pickled_module = tmp_path / "module.pt"
    torch.save({"model": model, "iteration": 1}, pickled_module)
    with pytest.raises(CheckpointError, match=r"module\.pt holds objects other than tensors"):
        load_checkpoint(pickled_module, model, None)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.pt is truncated or corrupt"):
        load_checkpoint(text, model, None)


@pytest.mark.parametrize("switch,value", [("remove_rope", True), ("use_post_norm", True),
                                          ("d_ff", 32), ("ffn_type", "silu")])
def test_checkpoint_of_differently_configured_model_names_the_fields(tmp_path, switch, value):
    other, opt = _setup(**{switch: value})
    path = tmp_path / "other.pt"
    save_checkpoint(other, opt, 1, path)
    model, opt2 = _setup()
    with pytest.raises(CheckpointError, match=rf"other\.pt.*{switch}: checkpoint {value!r}"):
        load_checkpoint(path, model, opt2)


def test_kernels_setting_does_not_block_loading(tmp_path):
    model, opt = _setup()
    save_checkpoint(model, opt, 4, tmp_path / "c.pt")
    model2, opt2 = _setup(seed=3, kernels="auto")
    assert load_checkpoint(tmp_path / "c.pt", model2, opt2) == 4


def test_missing_and_unexpected_weights_without_config(tmp_path):
    a = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    b = torch.nn.Sequential(torch.nn.Linear(3, 3))
    save_checkpoint(a, None, 0, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match=r"a\.pt does not fit this model: .*unexpected"):
        load_checkpoint(tmp_path / "a.pt", b, None)
    c = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    with pytest.raises(CheckpointError, match=r"a\.pt does not fit this model: 3 weights differ in shape"
                                              r".*0\.weight \(3, 3\) vs \(4, 3\)"):
        load_checkpoint(tmp_path / "a.pt", c, None)


def test_optimizer_errors(tmp_path):
    model, opt = _setup()
    save_checkpoint(model, None, 2, tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match=r"weights\.pt holds no optimizer state"):
        load_checkpoint(tmp_path / "weights.pt", model, opt)
    assert load_checkpoint(tmp_path / "weights.pt", model, None) == 2
    save_checkpoint(model, opt, 2, tmp_path / "full.pt")
    wrong = AdamW(list(model.parameters())[:2])
    with pytest.raises(CheckpointError, match=r"full\.pt: its optimizer state does not fit"):
        load_checkpoint(tmp_path / "full.pt", model, wrong)


def test_wrapped_models_and_other_cs336_layouts(tmp_path):
    model, opt = _setup()

    class Wrapper(torch.nn.Module):  # stands in for DistributedDataParallel's .module
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    save_checkpoint(Wrapper(model), opt, 6, tmp_path / "w.pt")
    raw = torch.load(tmp_path / "w.pt", weights_only=True)
    assert "token_embeddings.weight" in raw["model"]
    fresh, _ = _setup(seed=5)
    assert load_checkpoint(tmp_path / "w.pt", Wrapper(fresh), None) == 6
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)

    # A plain {"model", "optimizer", "iteration"} dict with DDP-prefixed keys, as other CS336
    # implementations write.
    other = {"model": {f"module.{k}": v for k, v in model.state_dict().items()},
             "optimizer": opt.state_dict(), "iteration": 9}
    torch.save(other, tmp_path / "other.pt")
    fresh2, opt2 = _setup(seed=6)
    assert load_checkpoint(tmp_path / "other.pt", fresh2, opt2) == 9
    assert torch.equal(fresh2.lm_head.weight, model.lm_head.weight)
    with pytest.raises(CheckpointError, match="no RNG states"):
        restore_rng_state(load_checkpoint_full(tmp_path / "other.pt"))


def test_restore_rng_state_restores_each_generator():
    model, opt = _setup()
    buf = io.BytesIO()
    _seed_all(11)
    save_checkpoint(model, opt, 0, buf)
    draws = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    _seed_all(12)
    buf.seek(0)
    restore_rng_state(load_checkpoint_full(buf))
    assert torch.equal(torch.rand(3), draws[0])
    assert np.array_equal(np.random.rand(3), draws[1])
    assert [random.random() for _ in range(3)] == draws[2]
