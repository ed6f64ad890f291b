"""Atomic file writes (a crash or a full disk leaves either the old file or the new one, never a torn one), and
the one way tensor files are read (``load_weights_only``)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable


# torch.load(weights_only=True) has known bypasses before these releases (CVE-2025-32434 below 2.6,
# CVE-2026-24747 below 2.10): with an older torch no file is read, whatever it holds.
SAFE_TORCH = (2, 10)


class UnsafeTorchError(RuntimeError):
    """This torch release cannot read untrusted tensor files safely; the message says which release can."""


def load_weights_only(path: str | os.PathLike, **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True)`` on a torch release without known bypasses of that mode."""
    import torch

    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if version < SAFE_TORCH:
        raise UnsafeTorchError(f"refusing to read {path}: torch {torch.__version__} has known bypasses of "
                           f"weights_only loading (CVE-2025-32434, CVE-2026-24747); install torch >= "
                           f"{SAFE_TORCH[0]}.{SAFE_TORCH[1]}")
    return torch.load(path, weights_only=True, **kwargs)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read a chunk at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def current_umask() -> int:
    """The process's umask, read from /proc (no window in which another thread creates files under umask 0);
    where /proc lacks it, set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


class WriteError(RuntimeError):
    """An output could not be written; the message names the path, and the previous file is unchanged."""


def atomic_write(path: str | os.PathLike, write_fn: Callable[[BinaryIO], object]) -> Path:
    """Call ``write_fn(file)`` on a temporary file next to ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise WriteError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600; a plain open() would give this
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        # torch.save reports a full disk as a RuntimeError from its zip writer, wrapping the OSError.
        os_error = e if isinstance(e, OSError) else e.__context__ if isinstance(e.__context__, OSError) else None
        if os_error is not None:
            raise WriteError(f"cannot write {path}: {os_error.strerror or os_error}; the previous file is unchanged") from e
        if isinstance(e, RuntimeError) and not isinstance(e, WriteError):
            raise WriteError(f"cannot write {path}: {e}; the previous file is unchanged") from e
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def read_json(path: str | os.PathLike, error: type[Exception] = ValueError) -> Any:
    """Parse a UTF-8 JSON file; bad JSON or bad bytes raise ``error`` with a message naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e})") from None
    except ValueError as e:  # JSONDecodeError, or an integer of over 4,300 digits
        raise error(f"{path}: not valid JSON ({str(e)[:200]})") from None
    except RecursionError:  # json's parser recurses once per level of [ or {
        raise error(f"{path}: JSON nested too deeply (over ~{sys.getrecursionlimit()} levels)") from None


def abbreviate(value: Any, limit: int = 60) -> str:
    """``repr(value)`` for one field of a message, cut to about ``limit`` characters with the full length said, so
    a megabyte-long value never becomes a megabyte-long error line; printable (see :func:`printable`)."""
    if isinstance(value, str):
        more = f"... ({len(value)} characters)" if len(value) > limit else ""
        return printable(repr(value[:limit]) + more)
    if isinstance(value, (bool, int, float)) or value is None:
        huge = isinstance(value, int) and value.bit_length() > 200
        text = f"an int of {value.bit_length()} bits" if huge else repr(value)
        return printable(text[:limit])
    return f"a {type(value).__name__}"  # a container: its type, never its (possibly huge or deep) content


def printable(text: str) -> str:
    """``text`` safe to print as one field of one line: control and format characters (tab, newline, ESC, bidi
    overrides), backslashes and undecodable file-name bytes (surrogate escapes) written as backslash escapes, so
    a file name can neither forge an output line nor drive the terminal."""
    if text.isprintable() and "\\" not in text:
        return text  # the common case, unchanged
    out = []
    for ch in text:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (os.fsdecode's surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch.isprintable() or ch == " ":
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)
