"""Peak throughput of the devices we report against, and what this process runs on.

``resolve_device`` is the one place a device name (``auto``, ``cpu``, ``cuda``, ``cuda:N``,
``mps``) becomes a ``torch.device``, with a clear error when the device is not there.

GPU peaks are dense (no 2:4 sparsity) BF16 tensor-core FLOP/s from the vendor datasheets; the
datasheets print the sparse figure, which is twice the dense one. A CPU has no datasheet peak we
can trust across machines, so its "peak" is measured in the same session: the best of a few
large fp32 matmuls (``measure_cpu_matmul_flops``), and its bandwidth the best of a few large
copies (``measure_cpu_copy_bandwidth``). Reports name these as measured, not as peaks.

Sources (checked 2026): NVIDIA H100 Tensor Core GPU datasheet (SXM 1,979 / PCIe 1,513 /
NVL 1,671 sparse BF16 TFLOPS; 3.35 / 2.0 / 3.9 TB/s), NVIDIA H200 datasheet (SXM 1,979 / NVL
1,671 sparse; 141 GB at 4.8 TB/s), NVIDIA A100 datasheet (312 dense BF16 TFLOPS; 80 GB SXM at
2,039 GB/s), NVIDIA HGX B200 datasheet (4.5 PFLOPS sparse FP16/BF16 per GPU, 8 TB/s, 180 GB;
torchtitan v0.1.0 first listed B200 at the sparse 4.5e15 and later corrected it to 2.25e15),
NVIDIA L4 datasheet (242 sparse; 300 GB/s, 24 GB).
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cs336.config import ConfigError, check_device_name

if TYPE_CHECKING:
    import torch


def resolve_device(name: str, flag: str = "--train.device") -> torch.device:
    """``auto`` is CUDA, then MPS, then the CPU; an explicit device must be visible (ConfigError
    naming ``flag`` otherwise)."""
    import torch

    check_device_name(flag, name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{flag}={name!r} but no CUDA device is visible; use {flag}=cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{flag}='mps' but MPS is not available; use {flag}=cpu or auto")
    return torch.device(name)


def autocast_for(mode: str, device: torch.device):
    """The context of ``train.autocast``: ``bf16`` is ``torch.autocast(bfloat16)`` on ``device``
    (weights and optimizer stay fp32), ``none`` changes nothing. Trainer and profiler share it."""
    import torch

    if mode == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def device_memory(device: torch.device) -> int | None:
    """Total memory of ``device`` in bytes (CPU: physical RAM); None when unknown."""
    import torch

    try:
        if device.type == "cuda":
            return int(torch.cuda.get_device_properties(device).total_memory)
        if device.type == "cpu":
            return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, RuntimeError, AttributeError):
        return None
    return None


@dataclass(frozen=True)
class DeviceSpec:
    key: str
    name: str
    bf16_flops: float
    """Dense BF16 tensor-core peak, FLOP/s."""
    bandwidth: float
    """HBM bandwidth, bytes/s."""
    memory: int
    """Device memory, bytes."""
    source: str


_GB = 10**9
DEVICES = {
    spec.key: spec for spec in (
        DeviceSpec("h100-sxm", "NVIDIA H100 SXM", 989.4e12, 3.35e12, 80 * _GB, "H100 datasheet"),
        DeviceSpec("h100-pcie", "NVIDIA H100 PCIe", 756.5e12, 2.0e12, 80 * _GB, "H100 datasheet"),
        DeviceSpec("h100-nvl", "NVIDIA H100 NVL", 835.5e12, 3.9e12, 94 * _GB, "H100 datasheet"),
        DeviceSpec("h200", "NVIDIA H200 SXM", 989.4e12, 4.8e12, 141 * _GB, "H200 datasheet"),
        DeviceSpec("h200-nvl", "NVIDIA H200 NVL", 835.5e12, 4.8e12, 141 * _GB, "H200 datasheet"),
        DeviceSpec("a100", "NVIDIA A100 80GB SXM", 312e12, 2.039e12, 80 * _GB, "A100 datasheet"),
        DeviceSpec("b200", "NVIDIA B200", 2.25e15, 8.0e12, 180 * _GB, "HGX B200 datasheet"),
        DeviceSpec("l4", "NVIDIA L4", 121e12, 0.3e12, 24 * _GB, "L4 datasheet"),
    )
}
ALIASES = {"h100": "h100-sxm"}

# torch.cuda.get_device_name patterns, most specific first ("NVIDIA H100 80GB HBM3" is the SXM).
_NAME_PATTERNS = (
    (r"H100.*PCIe", "h100-pcie"), (r"H100.*NVL", "h100-nvl"), (r"H100", "h100-sxm"),
    (r"H200.*NVL", "h200-nvl"), (r"H200", "h200"), (r"A100", "a100"), (r"B200", "b200"),
    (r"\bL4\b", "l4"),
)


class UnknownDeviceError(ValueError):
    """A device name that is not in the peak table; the message lists the valid keys."""


def lookup(key: str) -> DeviceSpec:
    """The spec for a table key or alias (``h100``, ``h100-pcie``, ``a100``, ...)."""
    key = ALIASES.get(key.lower(), key.lower())
    if key not in DEVICES:
        raise UnknownDeviceError(f"unknown device {key!r}; valid choices: "
                                 f"{', '.join([*DEVICES, *ALIASES])}")
    return DEVICES[key]


def match_device_name(name: str) -> DeviceSpec | None:
    """The spec for a ``torch.cuda.get_device_name`` string, or None if the table lacks it."""
    for pattern, key in _NAME_PATTERNS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return DEVICES[key]
    return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device | str) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {cpu_model()} ({torch.get_num_threads()} threads)"


def versions() -> dict[str, str]:
    import torch

    out = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = "not installed"
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_cpu_matmul_flops(n: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of the best of ``repeats`` fp32 (n x n) @ (n x n) matmuls on this CPU."""
    import torch

    a = torch.randn(n, n)
    b = torch.randn(n, n)
    return 2 * n**3 / _best_seconds(lambda: torch.mm(a, b), repeats)


def measure_cpu_copy_bandwidth(numel: int = 2**25, repeats: int = 3) -> float:
    """Bytes/s of the best of ``repeats`` fp32 copies of ``numel`` elements (read + write)."""
    import torch

    src = torch.randn(numel)
    dst = torch.empty_like(src)
    return 2 * numel * 4 / _best_seconds(lambda: dst.copy_(src), repeats)


@dataclass(frozen=True)
class Peak:
    flops: float
    bandwidth: float
    label: str
    """What the figures are: a datasheet entry or an in-session measurement."""


def peak_for(device: torch.device | str) -> Peak:
    """Peak FLOP/s and bandwidth to report MFU against on ``device``.

    CUDA: the table's dense BF16 entry (UnknownDeviceError if the GPU is not listed). CPU: a
    large fp32 matmul and a large copy measured now.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        spec = match_device_name(name)
        if spec is None:
            raise UnknownDeviceError(f"GPU {name!r} is not in cs336.hardware.DEVICES; add its dense "
                                     f"BF16 peak there (known: {', '.join(DEVICES)})")
        return Peak(spec.bf16_flops, spec.bandwidth, f"{spec.name} dense BF16 ({spec.source})")
    flops = measure_cpu_matmul_flops()
    bandwidth = measure_cpu_copy_bandwidth()
    return Peak(flops, bandwidth, "CPU measured in-session: fp32 2048^3 matmul, 128 MiB copy")
