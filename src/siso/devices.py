"""Pick the device and the dtype of the frozen weights; nothing else in siso names a device."""

from __future__ import annotations

import torch

from .errors import SisoError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SisoError("--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu or auto.")
    if name == "mps" and not torch.backends.mps.is_available():
        raise SisoError("--device mps was asked for, but this PyTorch has no MPS support; use --device cpu or auto.")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Frozen weights: bf16 on GPUs that have it, fp16 where they do not, fp32 on the CPU.

    On the CPU half precision is slow and buys nothing, and fp32 keeps results bit-comparable with
    plain diffusers.
    """
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}.get(dtype, str(dtype))


def describe_device(device: torch.device) -> str:
    """The device as a person reads it: a GPU by its name."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type
