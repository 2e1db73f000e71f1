"""Resource bounds: the one place that says how many threads and how much memory vqkit may ask
the machine for, so a careless ``--threads 100000`` or a codebook of 10**9 entries is one clear
error naming the limit, not a segfault or the kernel's out-of-memory killer."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from vqkit.errors import VqkitError

MAX_THREADS = 1024  # a ceiling no config may name, whatever the machine


def cpu_count() -> int:
    """The cores this process may run on (its CPU affinity where the OS tells it)."""
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check_threads(n: int, what: str = "--threads") -> int:
    """``n`` when it is 1..the cores of this machine, else :class:`VqkitError` naming ``what``."""
    cores = cpu_count()
    if not 1 <= n <= cores:
        raise VqkitError(f"{what} must be 1..{cores} (the cores of this machine), got {n}")
    return n


@contextlib.contextmanager
def torch_threads(n: int, what: str = "--threads") -> Iterator[None]:
    """Run with ``n`` torch threads (checked by :func:`check_threads`), then restore the count."""
    import torch

    check_threads(n, what)
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def available_memory() -> int:
    """Bytes of memory this process could still get: MemAvailable, or free pages elsewhere."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(AttributeError, OSError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return 2**63


def check_memory(n_bytes: float, what: str) -> None:
    """Raise :class:`VqkitError` when ``what`` needs more than the memory available now."""
    available = available_memory()
    if n_bytes > available:
        raise VqkitError(
            f"{what} needs about {_size(n_bytes)} of memory, more than the "
            f"{_size(available)} available"
        )


def _size(n_bytes: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n_bytes < 1024 or unit == "GB":
            return f"{n_bytes:.0f} {unit}" if unit == "bytes" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return ""
