"""Atomic file writes, the checks every output path gets, small JSON helpers and PNG figures,
shared by every module that keeps files."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vqkit.errors import VqkitError

TEMPORARY_SUFFIX = ".tmp"  # atomic_path writes ``.NAME.PID.RANDOM.tmp`` beside ``NAME``
SIZE_LIMIT_REACHED = "the file size limit (ulimit -f) is reached"
STDIO = "-"  # the name of standard input or output: never a path to check or rename over
# Extensions of audio files: an output named so would be taken for audio (``encode x.wav y.wav``
# is a slip that would replace audio with code bytes).
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".aifc")
AUDIO_SUFFIXES += (".au", ".snd", ".caf", ".w64", ".rf64", ".m4a", ".aac", ".wma", ".raw")


def check_output(
    output: str | os.PathLike,
    *inputs: str | os.PathLike,
    refuse_suffixes: tuple[str, ...] = (),
) -> Path | None:
    """Check that a command may write ``output``; returns it as a Path (None for ``-``).

    Refused, with the reason: the same file (or folder) as one of ``inputs`` after resolving
    links; a name ending in one of ``refuse_suffixes``; a block device or socket. A character
    device or FIFO is fine: :func:`atomic_path` writes the bytes into it. Hidden temporary files
    of this name that a killed writer left (its process is gone) are removed.
    """
    if os.fspath(output) == STDIO:
        return None
    path = Path(output)
    for source in inputs:
        if os.fspath(source) != STDIO and _same(path, Path(source)):
            raise VqkitError(f"{path}: the output would overwrite the input {source}")
    if path.suffix.lower() in refuse_suffixes:
        raise VqkitError(
            f"{path}: the name ends in {path.suffix}, an audio format, but this command "
            "does not write audio"
        )
    kind = _special_kind(path)
    if kind in ("a block device", "a socket"):
        raise VqkitError(f"{path}: cannot write to {kind}")
    remove_stale_temporaries(path)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    A file on disk is therefore either the old one, the new one whole, or absent: never partial.
    On any exception the temporary file is removed and ``path`` is left untouched; an OSError
    or a library's write error (unwritable folder, disk full, ``path`` is a folder) becomes a
    :class:`VqkitError` naming ``path`` and the cause. The new file gets the permissions ``open``
    would give it (0o666 less the umask), not mkstemp's 0o600. A character device or FIFO
    (``/dev/null``, a named pipe) is never renamed over: the whole result is copied into it.
    The temporary name is ASCII-safe, so libraries that cannot open non-UTF-8 names still work.
    """
    path = Path(path)
    special = _special_kind(path) in ("a character device", "a FIFO")
    folder = Path(tempfile.gettempdir()) if special else path.parent
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=_temporary_prefix(path), suffix=TEMPORARY_SUFFIX, dir=folder
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
        if special:
            _copy_into(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        reason = _reason(e, path, tmp) if _is_write_error(e) else None  # while tmp is there
        tmp.unlink(missing_ok=True)
        if reason is not None:
            raise VqkitError(f"cannot write {path}: {reason}") from None
        raise
    finally:
        if special:
            tmp.unlink(missing_ok=True)


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
    if path.exists() and not path.is_file():  # a FIFO would block the read forever
        raise VqkitError(f"{path} is not a regular file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VqkitError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise VqkitError(f"{path} is not valid JSON: {_first_line(e)}") from None


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
    stray = sorted(p for p in Path(folder).glob(f".*{TEMPORARY_SUFFIX}") if p.is_file())
    for path in stray:
        path.unlink(missing_ok=True)
    return stray


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of ``path`` whose writer process is gone (killed, say);
    returns them. Those of a live process (another writer of the same name) are kept."""
    path = Path(path)
    prefix, stray = _temporary_prefix(path, pid=None), []
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            rest = entry.name[len(prefix) :].split(".")
            if (
                entry.name.startswith(prefix)
                and entry.name.endswith(TEMPORARY_SUFFIX)
                and len(rest) == 3
                and rest[0].isdigit()
                and not _alive(int(rest[0]))
                and entry.is_file(follow_symlinks=False)
            ):
                Path(entry.path).unlink(missing_ok=True)
                stray.append(Path(entry.path))
    return stray


def _temporary_prefix(path: Path, pid: int | None = -1) -> str:
    """``.NAME.PID.`` (``.NAME.`` when ``pid`` is None; this process's id by default), with a
    hash for NAME when it is not valid UTF-8 (libsndfile and safetensors cannot open such)."""
    name = path.name
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        name = "x" + hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    name = name[:120]  # keep the temporary's name within NAME_MAX
    if pid is None:
        return f".{name}."
    return f".{name}.{os.getpid() if pid == -1 else pid}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _same(output: Path, source: Path) -> bool:
    """Whether ``output`` names the same file or folder as ``source`` (links resolved)."""
    with contextlib.suppress(OSError):
        if output.exists() and source.exists():
            return os.path.samefile(output, source)
        return output.resolve() == source.resolve()
    return False


def _special_kind(path: Path) -> str | None:
    """What ``path`` is when it exists and is neither a regular file nor a folder."""
    try:
        mode = path.stat().st_mode
    except (OSError, ValueError):
        return None
    kinds = {
        stat.S_ISCHR: "a character device",
        stat.S_ISFIFO: "a FIFO",
        stat.S_ISBLK: "a block device",
        stat.S_ISSOCK: "a socket",
    }
    return next((kind for test, kind in kinds.items() if test(mode)), None)


def _copy_into(tmp: Path, path: Path) -> None:
    """Write the bytes of ``tmp`` into the device or FIFO ``path`` (opened, never replaced)."""
    with open(tmp, "rb") as source, open(path, "wb") as sink:
        shutil.copyfileobj(source, sink, 1 << 20)


def _is_write_error(e: BaseException) -> bool:
    """Whether ``e`` says a file could not be written: an OSError, or the write error of
    libsndfile or safetensors (a full disk, say). Only modules already imported can have
    raised, so none is imported here."""
    if isinstance(e, OSError):
        return True
    types = [getattr(sys.modules.get(m), n, None) for m, n in _LIBRARY_WRITE_ERRORS]
    return any(isinstance(e, t) for t in types if isinstance(t, type))


_LIBRARY_WRITE_ERRORS = (("soundfile", "LibsndfileError"), ("safetensors", "SafetensorError"))


def _umask() -> int:
    """The process's umask: from /proc on Linux, else by setting and restoring it."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _reason(e: BaseException, path: Path, tmp: Path | None = None) -> str:
    """Why ``path`` cannot be written, in words: a parent that is a file, a full disk, the file
    size limit (``ulimit -f``; ``tmp`` is the partial file), else the OS's or library's reason."""
    if path.is_dir():
        return "it is a folder"
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is not a folder"
            break
    if getattr(e, "errno", None) == errno.EFBIG and _size_limit() < math.inf:
        return SIZE_LIMIT_REACHED
    if getattr(e, "errno", None) is not None and getattr(e, "strerror", None):
        return e.strerror
    # libsndfile says "System error." and safetensors "IoError(...)": find the cause ourselves
    if "StorageFull" in str(e) or "No space left" in str(e) or _disk_full(tmp or path):
        return "no space left on the device"
    if tmp is not None and _at_size_limit(tmp):
        return SIZE_LIMIT_REACHED
    return _first_line(e)


def _disk_full(path: Path) -> bool:
    """Whether the file system of ``path`` has (almost) no free blocks left."""
    with contextlib.suppress(OSError):
        fs = os.statvfs(path.parent)
        return fs.f_bavail * fs.f_frsize < 64 * 1024
    return False


def _at_size_limit(tmp: Path) -> bool:
    """Whether ``tmp`` has grown to within a block of this process's file size limit."""
    with contextlib.suppress(OSError):
        return tmp.stat().st_size > _size_limit() - 64 * 1024
    return False


def _size_limit() -> float:
    """This process's file size limit in bytes (``ulimit -f``); inf when it has none."""
    import resource

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return math.inf if limit == resource.RLIM_INFINITY else limit


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
