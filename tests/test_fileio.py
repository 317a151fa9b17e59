"""cs336.fileio: a write either replaces the whole file or leaves the old one untouched."""

import os
import stat

import pytest

from cs336.fileio import atomic_open, atomic_write_bytes, atomic_write_text, current_umask


def test_write_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    atomic_write_text(path, "first\n")
    atomic_write_text(path, "second\n")
    assert path.read_text() == "second\n"
    atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.txt"]


def test_failing_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(path, "wb") as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_rejects_append_mode(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(tmp_path / "x", "a"):
            pass


@pytest.fixture
def umask():
    """Set the process umask for one test (restored afterwards)."""
    old = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600), (0o027, 0o640)])
def test_new_file_honours_umask(tmp_path, umask, mask, expected):
    umask(mask)
    assert current_umask() == mask
    atomic_write_text(tmp_path / "new.txt", "x")
    with atomic_open(tmp_path / "new.bin", "wb") as f:
        f.write(b"x")
    # What plain open() gives under the same umask is the reference.
    (tmp_path / "plain.txt").write_text("x")
    for name in ("new.txt", "new.bin", "plain.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name


@pytest.mark.parametrize("existing", [0o644, 0o600, 0o664, 0o444])
def test_overwrite_keeps_the_mode_of_the_replaced_file(tmp_path, umask, existing):
    umask(0o077 if existing != 0o600 else 0o002)  # a umask that would give another mode
    path = tmp_path / "f.txt"
    path.write_text("old")
    path.chmod(existing)
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert stat.S_IMODE(path.stat().st_mode) == existing


def test_token_file_and_sidecar_honour_umask(tmp_path, umask):
    from cs336.tokenizer import Tokenizer
    from cs336.tokenizer.encode_file import encode_file

    umask(0o002)
    (tmp_path / "in.txt").write_text("hello world", encoding="utf-8")
    encode_file(tmp_path / "in.txt", tmp_path / "out.bin", Tokenizer({b: bytes([b]) for b in range(256)}, []))
    for name in ("out.bin", "out.bin.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o664, name
