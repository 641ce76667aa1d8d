"""Devices, precision and CPU capabilities, shared by inference, training and the models.

Which device a run uses (:func:`resolve_device`), which autocast dtype a precision setting gives
there (:func:`autocast_dtype`), and whether the hardware computes bf16 natively
(:func:`cuda_has_native_bf16`, :func:`cpu_has_native_bf16`). Only torch is needed, so every
layer of the package can ask these questions without importing another.
"""

from __future__ import annotations

import functools
import logging

import torch

from wsi_cmaf.errors import ConfigError

logger = logging.getLogger(__name__)

#: /proc/cpuinfo flags of x86 CPUs that compute bf16 natively (Sapphire Rapids+, Cooper Lake, Zen 4+)
NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present, else CPU; a name is checked (a valid torch device,
    and CUDA actually available when asked for), so a wrong device fails before any work."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"device {device!r} is not a torch device name ({exc})") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return resolved


def autocast_dtype(device: torch.device, mode: str) -> torch.dtype | None:
    """The autocast dtype for ``mode`` ("auto", "bf16", "fp16", "off") on ``device`` (None = full precision)."""
    if mode == "off":
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if cuda_has_native_bf16() else torch.float16
    # On CPU bf16 pays only where the hardware computes it (AMX / AVX512-BF16): elsewhere
    # oneDNN emulates it, which is slower than fp32 and still changes the numbers.
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None


def cuda_has_native_bf16() -> bool:
    """Whether the current CUDA device computes bf16 natively (compute capability 8.0 and newer).

    ``torch.cuda.is_bf16_supported()`` also says yes where bf16 is only emulated (V100, T4), which
    runs slower than fp16 there.
    """
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch releases without the argument counted native support only
        return bool(torch.cuda.is_bf16_supported())


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none, e.g. macOS, Windows)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError as exc:
        logger.debug("no CPU flags: %s", exc)
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matrix kernels natively (checked at run time, once).

    Both must hold: PyTorch dispatches AVX-512 kernels (``get_cpu_capability``; not when
    ``ATEN_CPU_CAPABILITY`` forces a lower level or on non-x86 CPUs) and the CPU reports AMX-BF16
    or AVX512-BF16. Unknown means no: fp32 is always correct, bf16 is only faster where native.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    return capability.upper().startswith("AVX512") and bool(NATIVE_BF16_FLAGS & cpu_flags())
