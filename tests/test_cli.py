"""cs336.cli.run_cli: the top level every command shares (user-fixable OSErrors, closed stdout)."""

import errno
import os

import pytest

from cs336.cli import run_cli, user_error_message
from cs336.fileio import WriteError


def _fails_with(exc):
    def body():
        raise exc
    return body


def _exit(capsys, body, **kwargs):
    with pytest.raises(SystemExit) as raised:
        run_cli(body, **kwargs)
    err = capsys.readouterr().err
    return raised.value.code, err


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EBUSY, errno.EDQUOT,
                                  errno.ENOENT, errno.EISDIR, errno.ENOTDIR])
def test_user_fixable_oserror_is_one_line_exit_2(capsys, code):
    status, err = _exit(capsys, _fails_with(OSError(code, os.strerror(code), "/data/out.bin")))
    assert status == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: /data/out.bin: {os.strerror(code)}; ")


def test_oserror_without_a_file_and_a_rename_still_say_what_to_do(capsys):
    assert user_error_message(OSError(errno.ENOSPC, "No space left on device")) == (
        "No space left on device; free space on that file system or write somewhere else")
    assert user_error_message(OSError(errno.EXDEV, "Invalid cross-device link", "a", None, "b")).startswith("a -> b: ")


def test_write_error_keeps_its_own_message(capsys):
    status, err = _exit(capsys, _fails_with(WriteError(errno.ENOSPC, os.strerror(errno.ENOSPC), "ck.pt")))
    assert status == 2 and err == ("error: cannot write ck.pt: No space left on device; free space on that "
                                   "file system or write somewhere else\n")


def test_a_bug_keeps_its_traceback():
    with pytest.raises(KeyError):
        run_cli(_fails_with(KeyError("x")))
    with pytest.raises(OSError):  # an errno no user can fix (here: a bad file descriptor)
        run_cli(_fails_with(OSError(errno.EBADF, "Bad file descriptor")))


def test_commands_own_errors_and_exit_codes_pass_through(capsys):
    class Diverged(RuntimeError):
        pass

    status, err = _exit(capsys, _fails_with(Diverged("loss is nan")), exit_codes={Diverged: 1})
    assert status == 1 and err == "error: loss is nan\n"
    status, err = _exit(capsys, _fails_with(ValueError("bad --x")), user_errors=(ValueError,))
    assert status == 2 and err == "error: bad --x\n"


def test_closed_stdout_ends_quietly(capsys):
    run_cli(_fails_with(BrokenPipeError(errno.EPIPE, "Broken pipe")))
    assert capsys.readouterr().err == ""


def test_sigint_is_one_line_exit_130(capsys):
    status, err = _exit(capsys, _fails_with(KeyboardInterrupt()), on_interrupt=lambda: "nothing written")
    assert status == 130 and err == "interrupted by SIGINT: nothing written\n"


def test_kernel_choices_in_help_are_the_backends():
    from cs336 import ops
    from cs336.config import kernel_backends

    assert kernel_backends() == ops.BACKENDS


@pytest.mark.parametrize("command", ["train", "generate", "export", "sweep", "experiments", "accounting",
                                     "profile", "tokenizer"])
def test_help_does_not_import_torch(command):
    """--help of every command answers without paying the torch import (seconds on a loaded machine)."""
    import subprocess
    import sys
    from pathlib import Path

    code = (f"import sys; sys.argv = ['x', '--help']; import runpy\n"
            f"try:\n    runpy.run_module('cs336.{command}', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'numba' in sys.modules)")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "False False", proc.stdout[-300:]


def test_an_unknown_flag_of_a_subcommand_suggests_the_closest(capsys):
    # the hints came from the top-level parser only, so `experiments run`'s typo got none
    from cs336 import experiments

    with pytest.raises(SystemExit) as exc:
        experiments.main(["run", "lr", "--model.dmodel=64"])
    assert exc.value.code == 2
    assert "unknown arguments: --model.dmodel=64 (did you mean --model.d_model" in capsys.readouterr().err
