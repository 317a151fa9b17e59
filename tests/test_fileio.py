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


# ------------------------------------------------------------- failures the user can fix

@pytest.fixture
def disk_full(monkeypatch):
    """Every atomic write goes to /dev/full (the kernel answers ENOSPC), through a real temp name;
    ``disk_full(pattern)`` limits it to destinations whose name contains ``pattern``."""
    import cs336.fileio as fileio

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    real = fileio.temp_beside
    chosen = {"pattern": ""}

    def full(path, suffix=".tmp"):
        fd, tmp = real(path, suffix)
        if chosen["pattern"] in os.fspath(path):
            os.close(fd)
            fd = os.open("/dev/full", os.O_WRONLY)
        return fd, tmp

    monkeypatch.setattr(fileio, "temp_beside", full)
    return lambda pattern="": chosen.update(pattern=pattern)


def test_disk_full_is_a_write_error_naming_the_file_and_keeps_the_old_one(tmp_path, disk_full):
    import errno

    from cs336.fileio import WriteError

    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    disk_full()
    with pytest.raises(WriteError) as exc:
        atomic_write_bytes(path, b"x" * 100_000)
    assert exc.value.errno == errno.ENOSPC
    assert str(exc.value) == (f"cannot write {path}: No space left on device; free space on that file "
                              "system or write somewhere else")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_torch_and_safetensors_write_failures_become_write_errors(tmp_path, monkeypatch):
    """torch's zip writer drops the errno; safetensors puts it in its message."""
    import errno

    import cs336.fileio as fileio
    from cs336.fileio import WriteError, writing

    torch_text = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
    monkeypatch.setattr(fileio, "_nearly_full", lambda d: True)
    with pytest.raises(WriteError) as exc:
        with atomic_open(tmp_path / "c.pt") as f:
            f.write(b"part")
            raise RuntimeError(torch_text)
    assert exc.value.errno == errno.ENOSPC and "c.pt" in str(exc.value)
    assert list(tmp_path.iterdir()) == []

    class SafetensorError(Exception):
        pass

    with pytest.raises(WriteError) as exc:
        with writing(tmp_path / "m.safetensors"):
            raise SafetensorError('Error while serializing: IoError(Os { code: 122, kind: QuotaExceeded, '
                                  'message: "Disk quota exceeded" })')
    assert exc.value.errno == errno.EDQUOT and "quota" in str(exc.value)
    monkeypatch.setattr(fileio, "_nearly_full", lambda d: False)
    with pytest.raises(WriteError) as exc:
        with writing(tmp_path / "c.pt"):
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    assert exc.value.errno == errno.EIO


def test_unrelated_errors_pass_unchanged(tmp_path):
    from cs336.fileio import writing

    with pytest.raises(FileNotFoundError):  # about another file: it names that one itself
        with writing(tmp_path / "out.bin"):
            open(tmp_path / "elsewhere" / "in.txt")
    with pytest.raises(RuntimeError, match="shape"):
        with writing(tmp_path / "out.bin"):
            raise RuntimeError("shape mismatch")


@pytest.mark.parametrize("code, fix", [(13, "fix its permissions"), (30, "write somewhere else"),
                                       (16, "another process holds it")])
def test_refused_temp_file_is_a_write_error_naming_the_destination(tmp_path, monkeypatch, code, fix):
    """mkstemp refused (no permission, read-only file system, busy): simulated, so the test holds
    under root too."""
    import cs336.fileio as fileio
    from cs336.fileio import WriteError

    def refuse(dir, prefix, suffix):
        raise OSError(code, os.strerror(code), os.path.join(dir, prefix + "abc" + suffix))

    monkeypatch.setattr(fileio.tempfile, "mkstemp", refuse)
    with pytest.raises(WriteError) as exc:
        atomic_write_text(tmp_path / "f.txt", "x")
    assert str(exc.value).startswith(f"cannot write {tmp_path / 'f.txt'}: {os.strerror(code)}; ")
    assert fix in str(exc.value)


def test_a_file_where_a_directory_should_be_is_named_as_such(tmp_path):
    from cs336.fileio import WriteError

    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(WriteError) as exc:
        atomic_write_text(tmp_path / "notes.txt" / "sub" / "f.txt", "x")
    assert "a component of the path is a file" in str(exc.value)
