"""Where a job computes: the compute device (``--device``), its free memory, and byte sizes.

Not to be confused with the *hardware* (``quant.costs``), the GPU a quantized model will be
served on: a job may compute on the CPU and predict latency for an H100.

``auto`` is the first CUDA device when torch sees one, else the CPU. Asking for ``cuda`` on a
machine without CUDA is an error that says so, never a silent fall back to the CPU: a job
that was meant to take minutes on a GPU would take days on a CPU.
"""

from __future__ import annotations

import re
from typing import Any

import torch

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30,
          "ti": 2**40, "tib": 2**40}


def check_device_name(name: str) -> str:
    """``name`` if it is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; a ValueError naming the choices otherwise.
    Says nothing about this machine: a job is checked at submit, where it may not run."""
    if not _DEVICE.match(name):
        raise ValueError(f"device {name!r}: choose auto, cpu, cuda or cuda:N")
    return name


def resolve_device(name: str) -> torch.device:
    """The torch device ``name`` means on this machine; ``cuda`` where torch sees no CUDA device is refused."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but torch sees no CUDA device on this machine "
                         f"(torch {torch.__version__}); use --device cpu or auto")
    device = torch.device(name)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"device {name!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device


def free_memory(device: torch.device) -> int:
    """Bytes free for tensors on ``device``: the GPU's free memory, or the memory the OS has available."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def parse_bytes(value: str | int) -> int:
    """A size in bytes from ``12345``, ``512MB`` or ``24GiB`` (k/M/G/T are powers of 10, Ki/Mi/Gi/Ti of 2)."""
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(value)
        if match is None or match[2] is not None and match[2].lower() not in _UNITS:
            raise ValueError(f"size {value!r}: give bytes, or a number with a unit such as 512MB or 24GiB")
        size = int(float(match[1]) * _UNITS[(match[2] or "").lower()])
    if size <= 0:
        raise ValueError(f"size {value!r} must be positive")
    return size


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of the module's first real (non-meta) parameter or buffer; the CPU when it has none."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def to_device(inputs: Any, device: torch.device) -> Any:
    """Model inputs (a tensor, or a dict, tuple or list of them) on ``device``; anything else as it is."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, dict):
        return {key: to_device(value, device) for key, value in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(to_device(value, device) for value in inputs)
    return inputs
