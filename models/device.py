"""Device and precision choice shared by training and serving: `auto` means CUDA when present."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import torch

# CPU flags that give bf16 matrix units or instructions (AMX on Intel Xeons since Sapphire Rapids, AVX-512 BF16 on
# AMD Zen 4 and Intel Cooper Lake): without them bf16 is emulated and slower than float32.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` picks CUDA when present, the CPU otherwise."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@functools.cache
def cpu_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, ...]:
    """The bf16 flags this CPU has (empty where it has none or /proc/cpuinfo cannot be read)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return ()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    flags = set(line.partition(":")[2].split())
    return tuple(f for f in BF16_CPU_FLAGS if f in flags)


def use_bf16(device: torch.device, precision: str, cpu_flags: tuple[str, ...] | None = None) -> bool:
    """Whether to train/evaluate under bf16 autocast: always on CUDA unless fp32 is asked for; on the CPU only when
    bf16 is asked for and the CPU has bf16 instructions (else float32, which is faster there)."""
    if precision == "fp32":
        return False
    if device.type == "cuda":
        return True
    if precision != "bf16" or device.type != "cpu":
        return False
    return bool(cpu_bf16_flags() if cpu_flags is None else cpu_flags)


def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile cannot build kernels for `device` on this machine, or None when it can: inductor compiles
    C++ for the CPU (the compiler named by $CXX, g++ by default) and Triton kernels for CUDA."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton is not installed"
    from torch._inductor import config

    cxx = config.cpp.cxx[-1]
    return None if cxx and shutil.which(cxx) else f"no C++ compiler ({cxx!r} is not on PATH)"
