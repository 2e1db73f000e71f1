"""Atomic file writes, small JSON helpers and PNG figures, shared by every module that keeps
files."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vqkit.errors import VqkitError

TEMPORARY_SUFFIX = ".tmp"  # atomic_path writes ``.NAME.RANDOM.tmp`` beside ``NAME``


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    A file on disk is therefore either the old one, the new one whole, or absent: never partial.
    On any exception the temporary file is removed and ``path`` is left untouched; an OSError
    (unwritable folder, disk full, ``path`` is a folder) becomes a :class:`VqkitError`. The new
    file gets the permissions ``open`` would give it (0o666 less the umask), not mkstemp's 0o600.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent
        )
    except OSError as e:
        raise VqkitError(f"cannot write {path}: {_reason(e, path)}") from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the writer may have replaced tmp: set the mode now
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise VqkitError(f"cannot write {path}: {_reason(e, path)}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def check_readable(path: str | os.PathLike, what: str = "a file") -> Path:
    """``path`` when it is a regular file (or a link to one), else :class:`VqkitError` saying
    what it is instead: missing, a folder, a pipe or a device (which a reader would block on or
    consume), or ``-`` (standard input, which these readers do not take)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if str(path) == "-":
            raise VqkitError(
                f"cannot read '-': reading standard input is not supported; give {what} by path"
            ) from None
        raise VqkitError(f"cannot read {path}: no such file") from None
    except OSError as e:
        raise VqkitError(f"cannot read {path}: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        raise VqkitError(f"cannot read {path}: it is a folder, not {what}")
    if not stat.S_ISREG(mode):
        kind = "a pipe (FIFO)" if stat.S_ISFIFO(mode) else "a device or socket"
        raise VqkitError(f"cannot read {path}: it is {kind}, not a regular file; give {what}")
    return path


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, raising :class:`VqkitError` with the path when it is missing or broken."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise VqkitError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise VqkitError(f"{path} is not valid JSON: {e}") from None


def new_figure(width: float, height: float, dpi: int = 100) -> Any:
    """A matplotlib figure of ``width`` x ``height`` inches on the Agg canvas (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Any, path: str | os.PathLike) -> Path:
    """Write ``figure`` as a PNG at ``path``, atomically; returns the path."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return Path(path)


def remove_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that writers killed inside :func:`atomic_path` left in
    ``folder`` (not below it); returns them. Call it only while no one else writes there."""
    stray = sorted(Path(folder).glob(f".*{TEMPORARY_SUFFIX}"))
    for path in stray:
        path.unlink(missing_ok=True)
    return stray


def _umask() -> int:
    """The process's umask: from /proc on Linux, else by setting and restoring it."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _reason(e: OSError, path: Path) -> str:
    """Why ``path`` cannot be written, in words: a parent that is a file, else the OS's reason."""
    if path.is_dir():
        return "it is a folder"
    for parent in path.parents:
        if parent.exists():
            return f"{parent} is not a folder" if not parent.is_dir() else (e.strerror or str(e))
    return e.strerror or str(e)
