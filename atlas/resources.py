"""What this machine has room for: memory (or the GPU's) and disk, read cheaply before a stage
commits to work that cannot fit, so a size that cannot fit is refused up front with its figure."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from atlas.errors import AtlasError


def available_memory(device=None) -> int:
    """Bytes free for new tensors: the GPU's free memory for a cuda device, else MemAvailable."""
    if device is not None and getattr(device, "type", str(device)) == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def free_disk(path: Path) -> int:
    """Bytes free on the file system that holds `path` (or the nearest folder above it that exists)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def size(n: float) -> str:
    """Bytes as people read them: 1.5 GB, 312 MB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{int(n)} B"


def require_memory(need: float, what: str, advice: str, device=None) -> None:
    """Stop with one line when `what` needs more memory than is free."""
    have = available_memory(device)
    if need > have:
        where = "GPU memory" if device is not None and getattr(device, "type", "") == "cuda" else "memory"
        raise AtlasError(f"{what} needs about {size(need)} of {where}, {size(have)} is free; {advice}")


def require_disk(need: float, path: Path, what: str, advice: str) -> None:
    """Stop with one line when writing `need` bytes under `path` cannot fit on its disk."""
    have = free_disk(path)
    if need > have:
        raise AtlasError(f"{what} needs about {size(need)} of disk under {path}, {size(have)} is free; {advice}")
