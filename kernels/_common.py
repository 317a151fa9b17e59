"""Helpers shared by the Triton kernel launchers: launch settings, input checks, device facts.

``calculate_settings`` picks a power-of-two block covering a row and a warp count for it, in the
manner of Liger-Kernel's ``ops/utils.py`` (written here independently). ``max_block_size`` caps
the block so tests can force the column-loop paths (a row wider than one block) at small sizes.
``simulated_gpu`` lets the launchers run on ``meta`` tensors as if on a GPU with a given SM
count: ``kernels.gpu_check`` uses it to capture the launches the launchers would make.
``launch`` wraps a kernel for ``triton_op`` tracing where the installed torch allows it, and
``_interpreter_index_fix`` lets triton 3.6's interpreter run under numpy 2.5 (see there).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Iterator

import torch
import triton
from torch.library import wrap_triton
from triton.runtime.jit import JITFunction

# CUDA's limit: 1024 threads (32 warps) per block.
MAX_WARPS = 32

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_block_cap: int | None = None
# SM count assumed for launches on ``meta`` tensors (None: no simulated GPU, see simulated_gpu).
_meta_sm_count: int | None = None


def _interpreter_index_fix() -> None:
    """Let triton 3.6's interpreter take a scalar tensor as a loop bound under numpy >= 2.5.

    Its ``tensor.__index__`` is ``int(self.handle.data)`` on a one-element 1-D array, which numpy
    2.5 rejects ("only 0-dimensional arrays can be converted"); triton 3.9 squeezes first. Where
    the installed interpreter has the old body, its patch gets the squeezing one after it.
    """
    try:
        from triton.runtime import interpreter
        source = inspect.getsource(interpreter._patch_lang_tensor)
    except (ImportError, AttributeError, OSError, TypeError):
        return
    if "int(self.handle.data))" not in source or getattr(interpreter, "_cs336_index_fix", False):
        return
    original = interpreter._patch_lang_tensor

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch
    interpreter._cs336_index_fix = True


def launch(kernel):
    """``wrap_triton(kernel)`` for a compiled kernel, the kernel itself under the interpreter.

    Inside a ``triton_op`` every launch goes through ``wrap_triton`` so torch.compile can trace it;
    torch 2.11's ``wrap_triton`` rejects the interpreter's ``InterpretedFunction`` (2.13 takes it),
    and eager interpreted launches need no wrapper.
    """
    return wrap_triton(kernel) if isinstance(kernel, JITFunction) else kernel


class KernelInputError(ValueError):
    """A tensor given to a Triton kernel has a dtype, device or shape the kernel cannot take."""


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if interpreted():
    _interpreter_index_fix()


@contextlib.contextmanager
def max_block_size(cap: int) -> Iterator[None]:
    """Cap the block size chosen by ``calculate_settings`` (tests force column loops with it)."""
    global _block_cap
    if cap < 16 or cap & (cap - 1):
        raise ValueError(f"block cap must be a power of two >= 16, got {cap}")
    previous = _block_cap
    _block_cap = cap
    try:
        yield
    finally:
        _block_cap = previous


def calculate_settings(n: int, per_thread: int = 16) -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps) for rows of ``n`` elements, at most ``per_thread`` per thread.

    The block is the next power of two of ``n``, capped at ``per_thread`` elements per thread of
    a 32-warp block (and by ``max_block_size``); the warps give each thread ``per_thread``
    elements of the block, at least 4 warps. Rows wider than the block are processed by the
    kernels in several column blocks. A kernel keeping k row-sized fp32 vectors live needs about
    k * per_thread registers per thread: the caller picks ``per_thread`` for its kernel.
    """
    block = triton.next_power_of_2(max(n, 1))
    block = min(block, per_thread * 32 * MAX_WARPS, _block_cap or block)
    num_warps = min(MAX_WARPS, max(4, block // (32 * per_thread)))
    return block, num_warps


@contextlib.contextmanager
def simulated_gpu(sm_count: int) -> Iterator[None]:
    """Launchers given ``meta`` tensors size their grids for a GPU with ``sm_count`` SMs."""
    global _meta_sm_count
    previous = _meta_sm_count
    _meta_sm_count = sm_count
    try:
        yield
    finally:
        _meta_sm_count = previous


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs(device: torch.device, work_items: int) -> int:
    """Persistent-grid size: two programs per SM on CUDA (a few in the interpreter), <= work."""
    if device.type == "cuda":
        target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    elif device.type == "meta" and _meta_sm_count is not None:
        target = 2 * _meta_sm_count
    else:
        target = 4
    return max(1, min(work_items, target))


def check_tensor(t: torch.Tensor, name: str, op: str, dtypes=SUPPORTED_DTYPES) -> None:
    """Raise ``KernelInputError`` unless ``t`` has a supported dtype and a device Triton can use."""
    if not isinstance(t, torch.Tensor):
        raise KernelInputError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise KernelInputError(
            f"{op}: {name} has dtype {str(t.dtype).replace('torch.', '')}; the Triton kernel "
            f"supports {names}. Cast it (e.g. .float()) or use the torch backend (--kernels torch)."
        )
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and interpreted():
        return
    raise KernelInputError(
        f"{op}: {name} is on {t.device}; the Triton kernel needs a CUDA tensor (or a CPU tensor "
        "with TRITON_INTERPRET=1 set before triton is imported). Move it with .cuda() or use the "
        "torch backend (--kernels torch)."
    )


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise KernelInputError(f"{op}: inputs are on different devices ({listing}); move them to one device")
