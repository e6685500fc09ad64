"""Device and precision for training: CUDA with mixed precision, a bf16-capable CPU (AVX512-BF16
or AMX) with bf16 autocast and channels_last, else fp32 on the CPU."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if check is not None)


@dataclass(frozen=True)
class TrainingDevice:
    device: str
    precision: str
    """bf16, fp16 or fp32: the autocast dtype (fp32: no autocast)."""
    channels_last: bool
    reason: str

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling is needed for fp16 only (bf16 has fp32's range)."""
        return torch.amp.GradScaler(self.device, enabled=self.precision == "fp16")

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x


def choose_training_device(precision: str = "auto", device: str | None = None) -> TrainingDevice:
    """CUDA when present (fp16 autocast, or bf16 when asked); on the CPU, bf16 autocast +
    channels_last when the CPU has bf16 instructions, fp32 otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        chosen = "fp16" if precision == "auto" else precision
        return TrainingDevice("cuda", chosen, True, f"CUDA, {chosen} autocast")
    if precision == "fp16":
        raise ValueError("fp16 training is for CUDA; on the CPU use bf16 or fp32")
    has_bf16 = cpu_supports_bf16()
    if precision == "bf16" and not has_bf16:
        log.warning("this CPU has no bf16 instructions: bf16 would be emulated and slow; training in fp32")
    if precision in ("auto", "bf16") and has_bf16:
        return TrainingDevice("cpu", "bf16", True, "CPU with bf16 instructions: bf16 autocast + channels_last")
    return TrainingDevice("cpu", "fp32", False, "CPU, fp32" + ("" if has_bf16 else " (no bf16 instructions)"))
