"""Which reduced precision the hardware supports, as autocast contexts.

CUDA: fp16 autocast (with a GradScaler for training).  CPU: bf16 autocast only where the CPU
has native bf16 instructions (AVX-512 BF16 or AMX); elsewhere bf16 is emulated and slower
than fp32, so it is never chosen automatically there.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

# Training and evaluation autocast; their "auto" is fp16 on CUDA and fp32 on the CPU.  The service's
# "auto" means something else (a guarded choice): utils/inference/predictor.py's SERVING_PRECISIONS.
AUTOCAST_PRECISIONS = ("auto", "fp32", "bf16")


# From the most specific: the first of these the CPU has names its kind.
CPU_KINDS = (("amx_tile", "amx"), ("avx512_bf16", "avx512_bf16"), ("avx512_vnni", "avx512_vnni"),
             ("avx512f", "avx512"), ("avx_vnni", "avx2_vnni"), ("avx2", "avx2"))


@functools.cache
def cpu_kind() -> str:
    """The instruction set that decides how bf16 and INT8 kernels round here (amx, avx512_bf16,
    avx512_vnni, avx512, avx2_vnni, avx2 or other): a reduced precision judged on one kind of CPU
    can change other pixels on another."""
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        flags = set(line.split(":", 1)[1].split())
    except (OSError, StopIteration):  # not Linux: torch's coarser view
        flags = {torch.backends.cpu.get_cpu_capability().lower().replace("avx512", "avx512f")}
    return next((kind for flag, kind in CPU_KINDS if flag in flags), "other")


def cpu_supports_bf16() -> bool:
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """The autocast context for ``precision`` on ``device``.

    ``auto``: fp16 on CUDA, fp32 on the CPU.  ``bf16``: bfloat16 on either (CPU only if supported).
    """
    if precision not in AUTOCAST_PRECISIONS:
        raise ValueError(f"precision must be one of {AUTOCAST_PRECISIONS}, not {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    if precision == "bf16" and cpu_supports_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()
