"""Which reduced precision the hardware supports, as autocast contexts.

CUDA: fp16 autocast (with a GradScaler for training).  CPU: bf16 autocast only where the CPU
has native bf16 instructions (AVX-512 BF16 or AMX); elsewhere bf16 is emulated and slower
than fp32, so it is never chosen automatically there.
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
from pathlib import Path

import torch

# Training and evaluation autocast; their "auto" is fp16 on CUDA and fp32 on the CPU.  The service's
# "auto" means something else (a guarded choice): utils/inference/predictor.py's SERVING_PRECISIONS.
AUTOCAST_PRECISIONS = ("auto", "fp32", "bf16")


# From the most specific: the first of these the CPU has names its kind.
CPU_KINDS = (("amx_tile", "amx"), ("avx512_bf16", "avx512_bf16"), ("avx512_vnni", "avx512_vnni"),
             ("avx512f", "avx512"), ("avx_vnni", "avx2_vnni"), ("avx2", "avx2"))
SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")


@functools.cache
def cpu_model_and_flags() -> tuple[str, frozenset[str]]:
    """The CPU's model name and its /proc/cpuinfo flags (empty off Linux)."""
    model, flags = platform.processor() or "cpu", frozenset()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = frozenset(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return model, flags


def cpu_description() -> str:
    """One line for every reported timing: the CPU's model, the cores this process may use and the
    SIMD flags that make one machine's figures 2-3x another's."""
    model, flags = cpu_model_and_flags()
    wanted = [flag for flag in SIMD_FLAGS if flag in flags]
    return f"{model}, {len(os.sched_getaffinity(0))} cores, {' '.join(wanted) or 'no AVX2'}"


@functools.cache
def cpu_kind() -> str:
    """The instruction set that decides how bf16 and INT8 kernels round here (amx, avx512_bf16,
    avx512_vnni, avx512, avx2_vnni, avx2 or other): a reduced precision judged on one kind of CPU
    can change other pixels on another."""
    flags = cpu_model_and_flags()[1]
    if not flags:  # not Linux: torch's coarser view
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
