"""What every trainer (``train segment``, ``train inpaint``, ``train masks``) shares.

- Device and precision: CUDA with mixed precision, a bf16-capable CPU (AVX512-BF16 or AMX) with
  bf16 autocast and channels_last, else fp32 on the CPU (:func:`choose_training_device`).
- Seeding (:func:`seed_training`).
- The run's files next to the output ``<out>``: ``<out>.last.pt``, the resume state (a
  :mod:`glomscan.checkpoint` file of kind ``training-state``), and ``<out>.metrics.csv``, one
  row per finished epoch (:class:`TrainingRun`). Both are written atomically, the CSV first;
  resuming drops CSV rows past the epoch of the resume state, so a crash between the two writes
  leaves neither a duplicate row nor a gap. Trainers write their networks with the same
  checkpoint module.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch

from ...atomic import atomic_write_text
from ...checkpoint import read_checkpoint_file, save_checkpoint_file

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if check is not None)


@dataclass(frozen=True)
class TrainingDevice:
    device: str
    """cpu, cuda or cuda:N."""
    precision: str
    """bf16, fp16 or fp32: the autocast dtype (fp32: no autocast)."""
    channels_last: bool
    reason: str

    @property
    def device_type(self) -> str:
        """cpu or cuda (what autocast and the gradient scaler take)."""
        return torch.device(self.device).type

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling is needed for fp16 only (bf16 has fp32's range)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.precision == "fp16")

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x


def choose_training_device(precision: str = "auto", device: str | None = None, cpu_bf16: bool = True) -> TrainingDevice:
    """``device`` (default: cuda when present, else cpu) and its precision. On CUDA: fp16
    autocast, or what was asked. On the CPU, "auto" is bf16 autocast + channels_last when the
    CPU has bf16 instructions and ``cpu_bf16`` is set, fp32 otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda":
        chosen = "fp16" if precision == "auto" else precision
        return TrainingDevice(device, chosen, True, f"CUDA, {chosen}" + (" autocast" if chosen != "fp32" else ""))
    if precision == "fp16":
        raise ValueError("fp16 training is for CUDA; on the CPU use bf16 or fp32")
    has_bf16 = cpu_supports_bf16()
    if precision == "bf16" and not has_bf16:
        log.warning("this CPU has no bf16 instructions: bf16 would be emulated and slow; training in fp32")
    if has_bf16 and (precision == "bf16" or (precision == "auto" and cpu_bf16)):
        return TrainingDevice(device, "bf16", True, "CPU with bf16 instructions: bf16 autocast + channels_last")
    return TrainingDevice(device, "fp32", False, "CPU, fp32" + ("" if has_bf16 else " (no bf16 instructions)"))


def seed_training(seed: int) -> None:
    """Seed torch (CPU and CUDA) and numpy's global generator."""
    torch.manual_seed(seed)
    np.random.seed(seed)


class TrainingRun:
    """The files of one training run next to ``out_path``: ``<out>.last.pt`` (resume state) and
    ``<out>.metrics.csv`` (one row per finished epoch, ``epoch`` counted from 1; a run that an
    earlier version wrote to ``<out><earlier_metrics_suffix>`` is resumed from that file).

    ``stateful`` names the objects whose ``state_dict`` the resume state keeps (models,
    optimisers, schedulers, gradient scalers), under those names. ``architecture`` (plain
    values), when given, must match the resume state's: a run does not continue another
    network's weights. ``optional`` names stateful objects that keep their fresh state when the
    resume state has none for them (older resume states; an fp16 gradient scaler resumed from a
    run whose scaler was disabled and saved an empty state).
    """

    def __init__(self, out_path: Path, stateful: Mapping[str, Any], architecture: dict | None = None,
                 optional: tuple[str, ...] = (), earlier_metrics_suffix: str | None = None):
        self.out_path = Path(out_path)
        self.last_path = self.out_path.with_suffix(".last.pt")
        self.metrics_path = self.out_path.with_suffix(".metrics.csv")
        self.earlier_metrics_path = self.out_path.with_suffix(earlier_metrics_suffix) if earlier_metrics_suffix else None
        self.stateful = dict(stateful)
        self.optional = frozenset(optional)
        self.architecture = architecture
        self.start_epoch = 0
        """The first epoch (from 0) this run trains: the one after the resume state's."""
        self.rows: list[dict] = []
        """The metrics rows of the finished epochs."""

    def resume(self) -> dict:
        """Continue from ``<out>.last.pt`` when there is one: the stateful objects get their
        saved state, :attr:`start_epoch` the epoch after the saved one, :attr:`rows` the CSV's
        rows up to the saved epoch (rows past it are from an epoch whose resume state was never
        written: it is trained again). Returns the other entries of the resume state (``{}`` for
        a fresh run)."""
        if not self.last_path.is_file():
            return {}
        saved = read_checkpoint_file(self.last_path, "training-state")
        architecture = saved.card.get("architecture") or self.architecture
        if self.architecture is not None and architecture != self.architecture:
            differing = ", ".join("--" + k.replace("_", "-") for k in self.architecture
                                  if architecture.get(k) != self.architecture[k])
            raise ValueError(f"{self.last_path} is a run with {architecture}, not {self.architecture}: "
                             f"use the same settings ({differing}) to resume, or another --out")
        for name, obj in self.stateful.items():
            if name in self.optional and not saved.state_dict.get(name):
                log.info("%s has no %s state: %s starts fresh", self.last_path, name, name)
                continue
            obj.load_state_dict(saved.state_dict[name])
        self.start_epoch = int(saved.extra["epoch"]) + 1
        metrics_path = self.metrics_path
        if not metrics_path.is_file() and self.earlier_metrics_path is not None and self.earlier_metrics_path.is_file():
            metrics_path = self.earlier_metrics_path
        rows = pd.read_csv(metrics_path).to_dict("records") if metrics_path.is_file() else []
        self.rows = [row for row in rows if row["epoch"] <= self.start_epoch]
        log.info("resuming from %s after epoch %d", self.last_path, self.start_epoch)
        others = {**saved.state_dict, **saved.extra}  # states this run does not take, and plain values
        return {k: v for k, v in others.items() if k not in self.stateful and k != "epoch"}

    def end_epoch(self, epoch: int, metrics: dict, **state) -> dict:
        """Record finished epoch ``epoch`` (from 0): the CSV with its row ``{"epoch": epoch + 1,
        **metrics}`` added, then the resume state (the stateful objects' state dicts, ``epoch``,
        the architecture and ``state``, plain values), each written atomically. Returns the row."""
        row = {"epoch": epoch + 1, **metrics}
        self.rows.append(row)
        atomic_write_text(self.metrics_path, pd.DataFrame(self.rows).to_csv(index=False))
        states = {name: obj.state_dict() for name, obj in self.stateful.items()}
        save_checkpoint_file(self.last_path, "training-state", {"architecture": self.architecture}, states,
                             {**state, "epoch": epoch})
        return row
