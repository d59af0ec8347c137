"""Which reduced precision the hardware supports, as autocast contexts.

CUDA: fp16 autocast (with a GradScaler for training).  CPU: bf16 autocast only where the CPU
has native bf16 instructions (AVX-512 BF16 or AMX); elsewhere bf16 is emulated and slower
than fp32, so it is never chosen automatically there.
"""
from __future__ import annotations

import contextlib

import torch

# Training and evaluation autocast; their "auto" is fp16 on CUDA and fp32 on the CPU.  The service's
# "auto" means something else (a guarded choice): utils/inference/predictor.py's SERVING_PRECISIONS.
AUTOCAST_PRECISIONS = ("auto", "fp32", "bf16")


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
