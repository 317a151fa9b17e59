"""SIGINT/SIGTERM for the command lines: one exception, raised only where it cannot crash.

- ``run_cli(body, ...)``: a command's top level. A user error is one line ``error: ...`` and exit
  2; an interruption one line naming what was kept (``Stage.report``) and 128 + signal; only
  rank 0 prints under torchrun. ``handling_signals()`` makes SIGINT/SIGTERM raise ``Interrupted``
  (a ``BaseException``); forked workers leave the decision to the parent.
- ``deferred_signals()``: a block a signal must not split (create a temporary file and remember
  its name); ``StopRequest()``: the training loop records a signal instead of raising it.
Deviation from Python's default handler: a signal that lands while numba code runs is not raised
there (an exception inside numba's callbacks into Python segfaults the process); the handler
sets a trace function on the Python frames above numba's, as pdb does, and the exception is
raised at the first line executed outside it. ``make_default_handler_numba_safe()`` does the
same for library users who keep Python's own SIGINT handler. Sources: the CPython ``signal``
documentation (handlers run between bytecodes in the main thread), ``sys.settrace``.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

RETRY_S = 0.01
"""Delay before a signal is delivered again when it arrived in numba code with no Python frame
above it (numba called from C), where no trace function can be set."""

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; ``exit_code`` is the shell convention 128 + signal number."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(self.signame)

    @property
    def signame(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _numba_root() -> str | None:
    numba = sys.modules.get("numba")
    root = getattr(numba, "__file__", None)
    if not root:
        return None
    return os.path.dirname(root) + os.sep


def _frames_above_numba(frame) -> list | None:
    """None when no frame of the stack is numba's; else the frames above the outermost one."""
    root = _numba_root()
    if root is None:
        return None
    chain = []
    while frame is not None:
        chain.append(frame)
        frame = frame.f_back
    numba_at = [i for i, f in enumerate(chain) if f.f_code.co_filename.startswith(root)]
    return chain[numba_at[-1] + 1:] if numba_at else None


def _retry_later(signum: int) -> None:
    timer = threading.Timer(RETRY_S, _thread.interrupt_main, args=(signum,))
    timer.daemon = True
    timer.start()


_armed = False  # a trace function waits to raise above numba


def _raise_outside_numba(frame, signum: int, make_exc: Callable[[], BaseException | None]) -> bool:
    """When ``frame`` runs inside numba, arrange for ``make_exc()`` (if not None) to be raised at
    the first line executed above it and return True; False when no numba frame is on the stack."""
    global _armed
    above = _frames_above_numba(frame)
    if above is None:
        return False
    if _armed:  # a second signal before the first surfaced: one exception is enough
        return True
    if not above:  # numba called from C with no Python caller: ask again later
        _retry_later(signum)
        return True
    previous = sys.gettrace()

    def fire(fr, event, arg):
        global _armed
        for f in above:
            f.f_trace = None
        sys.settrace(previous)
        _armed = False
        exc = make_exc()
        if exc is not None:
            raise exc

    _armed = True
    for f in above:
        f.f_trace = fire
    sys.settrace(lambda fr, event, arg: None)  # switch tracing on; new frames are not traced
    return True


_owner_pid: int | None = None
_raised = False
_deferring = 0
_pending: int | None = None


def _cli_handler(signum: int, frame) -> None:
    global _raised
    if os.getpid() != _owner_pid:  # a forked worker: the parent decides and terminates it
        if signum == signal.SIGTERM:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)
        return
    if _raised:
        return  # cleanup of the first interruption is running
    if _deferring:
        global _pending
        _pending = signum
        return
    if _raise_outside_numba(frame, signum, lambda: _interrupt_once(signum)):
        return
    _raised = True
    raise Interrupted(signum)


def _interrupt_once(signum: int) -> BaseException | None:
    global _raised
    if _raised or os.getpid() != _owner_pid:
        return None
    _raised = True
    return Interrupted(signum)


@contextlib.contextmanager
def handling_signals() -> Iterator[None]:
    """Within the block, SIGINT/SIGTERM raise ``Interrupted`` (see the module docstring).
    Outside the main thread, where handlers cannot be set, it changes nothing."""
    global _owner_pid, _raised
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    previous_owner = _owner_pid
    _owner_pid = os.getpid()
    _raised = False
    for s in SIGNALS:
        signal.signal(s, _cli_handler)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        _owner_pid = previous_owner
        _raised = False


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Within ``handling_signals``, a block that a signal must not cut in two (e.g. writing the
    files of one tokenizer): a signal arriving inside is raised when the block ends."""
    global _deferring, _pending, _raised
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _pending is not None:
            signum, _pending = _pending, None
            if os.getpid() == _owner_pid and not _raised:
                _raised = True
                raise Interrupted(signum)


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class Stage:
    """What a command is doing and what is kept, for the one line ``run_cli`` prints when a
    signal ends it (``on_interrupt=stage.report``). ``kept`` may be a function, asked at that
    moment (e.g. whether an output file changed since the stage began)."""

    def __init__(self, doing: str = "checking the configuration",
                 kept: str | Callable[[], str] = "nothing was written") -> None:
        self.doing, self.kept = doing, kept

    def set(self, doing: str, kept: str | Callable[[], str]) -> None:
        self.doing, self.kept = doing, kept

    def report(self) -> str:
        kept = self.kept() if callable(self.kept) else self.kept
        return f"stopped while {self.doing}; {kept}"


def run_cli(body: Callable[[], object], *, user_errors: tuple[type[BaseException], ...] = (ValueError, OSError),
            on_interrupt: Callable[[], str] | None = None, is_main: bool | None = None,
            exit_codes: dict[type[BaseException], int] | None = None) -> None:
    """Run ``body()`` as a command (see the module docstring); returns normally on success, else
    raises ``SystemExit`` with 2 (user error), 128 + signal (interruption) or the status
    ``exit_codes`` gives an error type (e.g. ``{TrainingDiverged: 1}``; checked first).

    ``on_interrupt()`` returns the clause naming what was done and what was kept (e.g. "nothing
    was written to out.bin"); ``user_errors`` are the exception types whose message is the whole
    story for the user; anything else keeps its traceback (a bug to report).
    """
    special = tuple((exit_codes or {}).keys())
    main = _rank() == 0 if is_main is None else is_main
    code = 0
    with handling_signals():
        try:
            body()
        except (Interrupted, KeyboardInterrupt) as exc:
            signum = exc.signum if isinstance(exc, Interrupted) else int(signal.SIGINT)
            code = 128 + signum
            if main:
                told = on_interrupt() if on_interrupt is not None else "nothing more was saved"
                print(f"interrupted by {signal.Signals(signum).name}: {told}", file=sys.stderr)
        except user_errors + special as exc:
            code = next((c for t, c in (exit_codes or {}).items() if isinstance(exc, t)), 2)
            if main:
                print(f"error: {exc}", file=sys.stderr)
    if code:
        raise SystemExit(code)


def _numba_safe_int_handler(signum: int, frame) -> None:
    if _raise_outside_numba(frame, signum, KeyboardInterrupt):
        return
    raise KeyboardInterrupt


_default_checked = False


def make_default_handler_numba_safe() -> None:
    """Swap Python's default SIGINT handler for ``_numba_safe_int_handler`` (same behaviour,
    deferred inside numba); leaves any other handler, and non-main threads, alone. The check is
    made once per process (the first call from the main thread), so the per-call cost is one
    global lookup."""
    global _default_checked
    if _default_checked or threading.current_thread() is not threading.main_thread():
        return
    _default_checked = True
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _numba_safe_int_handler)


def ignore_sigint_in_worker() -> None:
    """Pool initializer: a worker leaves Ctrl-C to its parent, which terminates the pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StopRequest:
    """Records SIGINT/SIGTERM while installed (main thread only) instead of raising."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self) -> StopRequest:
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: signals stay with the caller
            self._previous.clear()
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
