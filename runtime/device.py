"""Which device and which precision a stage runs on."""

from __future__ import annotations

import contextlib

import torch

from runtime.errors import ToolkitError


def pick_device(name: str) -> torch.device:
    """`auto` -> cuda, then mps, then cpu; anything else is passed to torch.device (one-line error
    for an unknown or unavailable device)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ToolkitError(f"unknown device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ToolkitError(f"device {name!r} requested but CUDA is not available here; use device=auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ToolkitError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} CUDA "
                           f"device(s), cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ToolkitError(f"device {name!r} requested but MPS is not available here; use device=auto")
    return device


def pick_dtype(name: str, device: torch.device) -> str:
    """`auto` -> bfloat16 where it is fast (CUDA with bf16, CPUs with AMX/AVX512-BF16), else float32."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if device.type == "cpu":
        try:
            flags = open("/proc/cpuinfo").read()
        except OSError:
            flags = ""
        return "bfloat16" if ("amx_bf16" in flags or "avx512_bf16" in flags) else "float32"
    return "float32"


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """torch.autocast for a lower-precision dtype, nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
