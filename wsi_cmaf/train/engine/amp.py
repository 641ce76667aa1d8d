"""Mixed precision of a training run: the ``precision`` setting, autocast + GradScaler, skipped updates.

:func:`resolve_precision` turns ``precision`` into fp32/bf16/fp16 for a device; :class:`Amp` holds the
autocast dtype and (fp16 only) the GradScaler; :class:`SkipMonitor` counts updates skipped for
non-finite gradients and tells loss-scale calibration from divergence.
:mod:`wsi_cmaf.train.engine.loop` uses them.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.optim import Optimizer

from wsi_cmaf.device import cuda_has_native_bf16
from wsi_cmaf.errors import ConfigError

logger = logging.getLogger(__name__)

#: GradScaler's first loss scale (torch's default); its first updates calibrate down from it.
#: :class:`Amp` reads it from this module, so a test that changes it patches it here, not on ``loop``.
FP16_INIT_SCALE = 2.0**16
#: Consecutive skipped updates that count as divergence (once loss scaling cannot explain them).
DIVERGENCE_STREAK = 24


def resolve_precision(mode: str, device_type: str, bf16_supported: bool | None = None) -> str:
    """The precision ("fp32", "bf16" or "fp16") a ``precision`` setting gives on a device type.

    ``auto``: bf16 on CUDA GPUs with native bf16 (no loss scaling needed: bf16 has fp32's exponent
    range), fp16 + GradScaler on older CUDA GPUs, fp32 elsewhere. ``bf16``/``fp16`` are honoured
    on any device; ``off`` is fp32.
    """
    if mode == "auto":
        if device_type != "cuda":
            return "fp32"
        if bf16_supported is None:  # emulated bf16 (pre-Ampere) is slower than fp16: native support only
            bf16_supported = cuda_has_native_bf16()
        return "bf16" if bf16_supported else "fp16"
    return {"off": "fp32", "bf16": "bf16", "fp16": "fp16"}[mode]


class Amp:
    """Autocast dtype and (fp16 only) the GradScaler of a run; see :func:`resolve_precision`.

    With fp16 the GradScaler (``torch.amp.GradScaler(device)``, CUDA or CPU) starts at
    ``init_scale`` and halves the scale on every update with non-finite gradients; those skipped
    updates are calibration, not divergence (:class:`SkipMonitor`).
    """

    def __init__(self, mode: str, device: torch.device, init_scale: float | None = None) -> None:
        self.device = device
        self.precision = resolve_precision(mode, device.type)
        self.dtype: torch.dtype | None = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        self.scaler: torch.amp.GradScaler | None = None
        if self.dtype is not None:
            try:  # torch disables (with a warning) or refuses autocast for unsupported device/dtype pairs
                enabled = torch.autocast(device.type, dtype=self.dtype)._enabled
            except RuntimeError:
                enabled = False
            if not enabled:
                raise ConfigError(f"precision {mode!r}: torch {torch.__version__} has no {self.precision} autocast on "
                                  f"{device.type}; use precision: off")
        if self.precision == "fp16":
            self.scaler = torch.amp.GradScaler(device.type, init_scale=init_scale or FP16_INIT_SCALE)
        logger.info("precision: %s%s on %s", self.precision, " + GradScaler" if self.scaler else "", device.type)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast context (a no-op in full precision)."""
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, scaled when a GradScaler is active."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: Optimizer) -> None:
        """Bring the gradients of ``optimizer``'s parameters back to true scale (no host sync).

        GradScaler allows one ``unscale_`` per optimizer and update; SAM's two passes are
        registered under SAM and under its base optimiser (same parameters), so each pass is
        unscaled exactly once and :meth:`update` backs off if either overflowed.
        """
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def update(self) -> None:
        """End of an optimiser update: adapt the loss scale."""
        if self.scaler is not None:
            self.scaler.update()

    def scale_explains_overflow(self) -> bool:
        """Whether skipped updates may still be loss-scale calibration (one host sync).

        At a scale >= 1 an overflow can come from the scaling; below 1 the scaled gradients are
        smaller than the true ones, so non-finite values are the gradients' (or the loss's) own.
        """
        return self.scaler is not None and self.scaler.get_scale() >= 1.0


class SkipMonitor:
    """Counts updates skipped for non-finite gradients on the device; read only at cheap points.

    Divergence rule: training stops when non-finite updates persist beyond what loss scaling can
    explain, i.e. while no GradScaler is active or its scale has fallen below 1
    (:meth:`Amp.scale_explains_overflow`), and either :data:`DIVERGENCE_STREAK` consecutive updates
    were skipped or a whole epoch had no applied update. From GradScaler's initial 2^16 a real
    divergence (NaN every step) therefore stops after 24 updates; calibration skips never count.
    """

    def __init__(self, device: torch.device) -> None:
        self.streak = torch.zeros((), device=device)
        self.reset_epoch()

    def reset_epoch(self) -> None:
        """Start an epoch's counts (the streak carries over: divergence may span epochs)."""
        self.skipped = torch.zeros((), device=self.streak.device)
        self.loss_sum = torch.zeros((), device=self.streak.device)
        self.warned = 0

    def record(self, found_inf: torch.Tensor, loss: torch.Tensor) -> None:
        """Add one update (``found_inf`` 1.0 = skipped); no host sync."""
        found = found_inf.to(self.streak.device)
        self.streak.add_(1.0).mul_(found)
        self.skipped.add_(found)
        self.loss_sum.add_(torch.where(found > 0, 0.0, loss.detach().float()))

    def check(self, amp: Amp, where: str, steps: int | None = None) -> tuple[int, int]:
        """Read the counts (one sync); warn about new skips; raise :class:`ConfigError` on divergence.

        ``steps``: updates of the finished epoch (end-of-epoch check), else None. Returns
        (skipped updates this epoch, current streak).
        """
        skipped, streak = (int(v) for v in torch.stack([self.skipped, self.streak]).tolist())
        calibrating = amp.scale_explains_overflow()
        if skipped > self.warned:  # calibration skips are expected: INFO, not WARNING
            logger.log(logging.INFO if calibrating else logging.WARNING,
                       "%s: %d update(s) skipped for non-finite gradients so far this epoch%s", where, skipped,
                       f" (loss scale now {amp.scaler.get_scale():g})" if amp.scaler is not None else "")
            self.warned = skipped
        whole_epoch = steps is not None and steps > 0 and skipped == steps
        if (streak >= DIVERGENCE_STREAK or whole_epoch) and not calibrating:
            what = f"every step of {where}" if whole_epoch else f"{streak} consecutive updates up to {where}"
            scaled = " at a loss scale below 1" if amp.scaler is not None else ""
            raise ConfigError(f"training diverged: {what} had non-finite gradients{scaled}; lower the learning "
                              "rate or set precision: off")
        return skipped, streak
