"""cs336.data: batch sampling, the sequential eval iterator, token files and their errors."""

import json

import numpy as np
import pytest
import torch

from cs336.data import TokenFileError, get_batch, iter_batches, load_tokens, num_windows, save_tokens, sidecar_path


def test_get_batch_shapes_shift_and_range():
    data = np.arange(100, dtype=np.uint16)
    g = torch.Generator().manual_seed(0)
    x, y = get_batch(data, batch_size=64, context_length=7, device="cpu", generator=g)
    assert x.shape == y.shape == (64, 7)
    assert x.dtype == y.dtype == torch.int64 and x.device.type == "cpu"
    # data[i] == i, so each row is a run of consecutive integers starting at its start index.
    starts = x[:, 0]
    assert torch.equal(x, starts[:, None] + torch.arange(7))
    assert torch.equal(y, x + 1)
    assert starts.min() >= 0 and starts.max() <= 100 - 7 - 1


def test_get_batch_covers_every_start_uniformly():
    data = np.arange(12, dtype=np.int32)
    g = torch.Generator().manual_seed(1)
    x, _ = get_batch(data, batch_size=8000, context_length=4, device="cpu", generator=g)
    counts = torch.bincount(x[:, 0], minlength=12)
    # Valid starts are 0..7 (len - T - 1 = 7); each should get 1000 +- a few sigma (~30).
    assert (counts[8:] == 0).all()
    assert counts[:8].min() > 880 and counts[:8].max() < 1120, counts


def test_get_batch_is_reproducible_and_uses_global_rng_without_generator():
    data = np.arange(1000, dtype=np.uint16)
    a = get_batch(data, 4, 8, "cpu", torch.Generator().manual_seed(5))
    b = get_batch(data, 4, 8, "cpu", torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0])
    torch.manual_seed(9)
    c = get_batch(data, 4, 8, "cpu")
    torch.manual_seed(9)
    d = get_batch(data, 4, 8, "cpu")
    assert torch.equal(c[0], d[0])


def test_get_batch_from_memmap_and_large_ids(tmp_path):
    tokens = np.array([65535, 0, 1, 2, 3, 65534, 7, 8], dtype=np.uint16)
    save_tokens(tmp_path / "t.bin", tokens)
    data = load_tokens(tmp_path / "t.bin")
    x, y = get_batch(data, 3, 7, "cpu", torch.Generator().manual_seed(0))
    # Only one window fits (start 0); uint16 values above 32767 must survive the int64 cast.
    assert x.tolist() == [tokens[:7].tolist()] * 3
    assert y.tolist() == [tokens[1:].tolist()] * 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.gpu
def test_get_batch_on_cuda():
    x, y = get_batch(np.arange(50), 2, 5, "cuda")
    assert x.device.type == "cuda" and y.device.type == "cuda"


def test_get_batch_errors():
    with pytest.raises(ValueError, match=r"10 tokens.*context_length \+ 1 = 11"):
        get_batch(np.arange(10), 2, 10, "cpu")
    with pytest.raises(ValueError, match="1-D"):
        get_batch(np.zeros((4, 4)), 2, 2, "cpu")
    with pytest.raises(ValueError, match="positive"):
        get_batch(np.arange(10), 0, 2, "cpu")


def test_iter_batches_is_sequential_and_complete():
    data = np.arange(23)
    batches = list(iter_batches(data, batch_size=2, context_length=5, device="cpu"))
    # (23 - 1) // 5 = 4 windows starting at 0, 5, 10, 15, in two batches.
    assert num_windows(data, 5) == 4
    assert [b[0].shape for b in batches] == [(2, 5), (2, 5)]
    xs = torch.cat([b[0] for b in batches])
    ys = torch.cat([b[1] for b in batches])
    assert xs[:, 0].tolist() == [0, 5, 10, 15]
    assert torch.equal(ys, xs + 1)
    assert len(list(iter_batches(data, 3, 5, "cpu"))) == 2  # 3 + a final batch of 1
    assert len(list(iter_batches(data, 1, 5, "cpu", max_batches=3))) == 3
    again = list(iter_batches(data, 2, 5, "cpu"))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))


def test_save_and_load_tokens_round_trip(tmp_path):
    tokens = np.array([1, 2, 3, 70000], dtype=np.int64)
    path = save_tokens(tmp_path / "sub" / "valid.bin", tokens, dtype="uint32", vocab_size=70001)
    meta = json.loads(sidecar_path(path).read_text())
    assert meta == {"dtype": "uint32", "count": 4, "vocab_size": 70001}
    loaded = load_tokens(path)
    assert isinstance(loaded, np.memmap) and loaded.dtype == np.uint32
    assert loaded.tolist() == tokens.tolist()
    assert not list(path.parent.glob(".*.tmp"))
    with pytest.raises(ValueError, match="wider dtype"):
        save_tokens(tmp_path / "x.bin", tokens, dtype="uint16")


def test_load_tokens_without_sidecar_uses_dtype_argument(tmp_path):
    path = tmp_path / "raw.bin"
    np.array([5, 6, 7, 8], dtype=np.int32).tofile(path)
    assert load_tokens(path, dtype=np.int32).tolist() == [5, 6, 7, 8]
    assert load_tokens(path).dtype == np.uint16  # the default
    assert len(load_tokens(path)) == 8


def test_load_tokens_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.bin"
    with pytest.raises(TokenFileError, match=r"missing\.bin does not exist"):
        load_tokens(missing)

    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(TokenFileError, match=r"empty\.bin is empty"):
        load_tokens(empty)

    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x02\x03")
    with pytest.raises(TokenFileError, match=r"odd\.bin has 3 bytes, not a multiple of 2"):
        load_tokens(odd)

    short = save_tokens(tmp_path / "short.bin", np.arange(10))
    with open(short, "r+b") as f:
        f.truncate(8)
    with pytest.raises(TokenFileError, match=r"holds 4 uint16 tokens but short\.bin\.json records 10"):
        load_tokens(short)

    conflict = save_tokens(tmp_path / "c.bin", np.arange(4))
    with pytest.raises(TokenFileError, match="says dtype uint16 but int32"):
        load_tokens(conflict, dtype=np.int32)

    bad_meta = tmp_path / "m.bin"
    np.arange(4, dtype=np.uint16).tofile(bad_meta)
    sidecar_path(bad_meta).write_text("{not json")
    with pytest.raises(TokenFileError, match=r"m\.bin\.json: unreadable"):
        load_tokens(bad_meta)

    raw = tmp_path / "raw.bin"
    np.arange(4, dtype=np.uint16).tofile(raw)
    with pytest.raises(TokenFileError, match="integer type"):
        load_tokens(raw, dtype=np.float32)


@pytest.mark.parametrize("count", ["x", None, 4.7, 4.0, True, -4, [4]])
def test_load_tokens_refuses_a_sidecar_count_that_is_not_a_token_count(tmp_path, count):
    """A sidecar 'count' must be a non-negative integer: a string ended in a bare ValueError not
    naming the file, None or a list in a TypeError traceback, and 4.7 passed as 4."""
    path = tmp_path / "t.bin"
    np.arange(4, dtype=np.uint16).tofile(path)
    sidecar_path(path).write_text(json.dumps({"dtype": "uint16", "count": count}))
    with pytest.raises(TokenFileError, match=r"t\.bin\.json: 'count' is .*re-encode t\.bin"):
        load_tokens(path)
    sidecar_path(path).write_text(json.dumps({"dtype": "uint16", "count": 4}))
    assert load_tokens(path).tolist() == [0, 1, 2, 3]


def test_save_tokens_refuses_non_integer_tokens_and_a_count(tmp_path):
    """Float ids were truncated (1.5, 2.7 saved as 1, 2), strings failed inside numpy, and a
    count= keyword replaced the sidecar's true count, so the file could not be loaded back."""
    for tokens in (np.array([1.5, 2.7]), np.array([1.0, 2.0]), ["1", "2"], np.array([1, 2], dtype=object)):
        with pytest.raises(ValueError, match="tokens must be integer ids"):
            save_tokens(tmp_path / "f.bin", tokens)
    with pytest.raises(ValueError, match="count=99 would replace"):
        save_tokens(tmp_path / "f.bin", [1, 2, 3], count=99)
    assert not list(tmp_path.iterdir())
    assert load_tokens(save_tokens(tmp_path / "ok.bin", [1, 2, 3], vocab_size=4)).tolist() == [1, 2, 3]
