"""Device resolution: the one place that turns a device name into a `torch.device`.

``auto`` is this process's GPU when CUDA is available (``cuda:<LOCAL_RANK mod GPU count>``, so every
rank of a torchrun job gets its own; LOCAL_RANK unset means 0), else the CPU. An explicit name
(``cpu``, ``cuda``, ``cuda:1``, ``mps``) is used as given; ``cuda`` without CUDA is a ConfigError,
as is a name torch does not know.
"""
from __future__ import annotations

import os

from kit.errors import ConfigError, clip

__all__ = ["resolve_device", "local_rank"]


def local_rank() -> int:
    """This process's rank on its node (torchrun's LOCAL_RANK; 0 outside torchrun)."""
    try:
        return int(os.environ.get("LOCAL_RANK", 0))
    except ValueError:
        raise ConfigError(f"environment variable LOCAL_RANK={clip(os.environ['LOCAL_RANK'])} is not an integer") from None


def resolve_device(name: str | None = "auto"):
    """`name` (auto | cpu | cuda | cuda:N | ...) -> torch.device (see the module docstring)."""
    import torch

    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank() % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        dev = torch.device(str(name))
    except (RuntimeError, ValueError) as exc:
        # torch's message repeats the whole value: quote it cut short there too
        raise ConfigError(f"bad device {clip(name)}: {str(exc).replace(str(name), clip(name))}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {clip(name)} requested but CUDA is not available here (use cpu or auto)")
    return dev
