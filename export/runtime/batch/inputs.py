"""The images a batch job captions: a directory, a glob, a text file of paths, or a Parquet/CSV table's column.

    fs, items = list_inputs(["s3://bucket/photos/", "more/*.jpg", "list.txt", "table.parquet"], path_column="path")

Each input names a filesystem pyarrow reaches: a local path, or a URI (``s3://``, ``gs://``, ``hdfs://``, ...)
when the user's credentials and packages are there. One job reads one filesystem (its decode tasks are given one).
A listed file that is missing or is not a regular file is an :class:`Item` with an ``error``: it becomes an output
row naming the problem, never a failed job. Paths are absolute (local) or full URIs: the output's ``path`` column,
and the key a rerun resumes by.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from core.images import IMAGE_EXTENSIONS

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_GLOB = re.compile(r"[*?\[]")
LIST_SUFFIXES = (".txt", ".lst")
TABLE_SUFFIXES = (".parquet", ".pq", ".csv")


def _scheme(path: str) -> str:
    m = _URI.match(path)
    return "" if not m or m.group(1) in ("file", "local") else m.group(1)


class BatchInputError(ValueError):
    """The inputs cannot be used at all (a missing list file, a table without the path column): nothing runs."""


@dataclass(frozen=True)
class Item:
    path: str  # absolute local path or full URI: the output's `path`
    fs_path: str  # the same file as the filesystem names it (what Ray's reader is given and returns)
    error: str | None = None


class Source:
    """One filesystem: how its paths look to the user (``s3://b/k``) and to pyarrow (``b/k``)."""

    def __init__(self, uri_or_path: str):
        import pyarrow.fs as pafs

        self.scheme = _scheme(uri_or_path)
        if not self.scheme:
            self.fs = pafs.LocalFileSystem()
        else:
            try:
                self.fs, _ = pafs.FileSystem.from_uri(uri_or_path)
            except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ... for one bad URI
                raise BatchInputError(f"{uri_or_path}: cannot open its filesystem ({e})") from None

    def to_fs(self, path: str) -> str:
        if not self.scheme:
            return os.path.abspath(path.removeprefix("file://").removeprefix("local://"))
        return _URI.sub("", path)

    def to_user(self, fs_path: str) -> str:
        return fs_path if not self.scheme else f"{self.scheme}://{fs_path}"

    def info(self, fs_path: str):
        return self.fs.get_file_info(fs_path)

    def read_text(self, fs_path: str) -> bytes:
        with self.fs.open_input_stream(fs_path) as f:
            return f.read()


def _is_image(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and os.path.splitext(base)[1].lower() in IMAGE_EXTENSIONS


def _listing(src: Source, fs_dir: str, recursive: bool, pattern: str | None = None) -> list[str]:
    import pyarrow.fs as pafs

    infos = src.fs.get_file_info(pafs.FileSelector(fs_dir, recursive=recursive))
    names = sorted(i.path for i in infos if i.type == pafs.FileType.File)
    if pattern is not None:  # hidden names only when the pattern says so, as a shell's glob
        hidden_ok = pattern.rsplit("/", 1)[-1].startswith(".")
        return [n for n in names if fnmatch.fnmatchcase(n, pattern)
                and (hidden_ok or not n.rsplit("/", 1)[-1].startswith("."))]
    return [n for n in names if _is_image(n)]


def _glob(src: Source, fs_pattern: str) -> list[str]:
    """Matches of a glob: the listing of its longest wildcard-free directory, filtered by fnmatch."""
    parts = fs_pattern.split("/")
    fixed = next(i for i, p in enumerate(parts) if _GLOB.search(p))
    base = "/".join(parts[:fixed]) or "/"
    recursive = len(parts) - fixed > 1 or "**" in fs_pattern
    return _listing(src, base, recursive, pattern=fs_pattern.replace("**/", "*").replace("**", "*"))


def _list_file(src: Source, fs_path: str, user: str) -> list[str]:
    """Lines of a text file of paths (blank lines and # comments skipped); relative ones are from its folder."""
    base = fs_path.rsplit("/", 1)[0]
    out = []
    for raw in src.read_text(fs_path).splitlines():
        line = os.fsdecode(raw.strip())
        if not line or line.startswith("#"):
            continue
        if _URI.match(line):
            if _scheme(line) != src.scheme:
                raise BatchInputError(f"{user}: {line} is on another filesystem than {user}; one job reads one")
            out.append(src.to_fs(line))
        else:
            out.append(line if line.startswith("/") else f"{base}/{line}")
    return out


def _table(src: Source, fs_path: str, user: str, column: str) -> list[str]:
    """The paths of a table's column; relative ones are from the table's folder, as in a text file of paths."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if fs_path.lower().endswith(".csv"):
            with src.fs.open_input_stream(fs_path) as f:
                table = pacsv.read_csv(f, convert_options=pacsv.ConvertOptions(include_columns=[column]))
        else:
            table = pq.read_table(fs_path, filesystem=src.fs, columns=[column])
    except (KeyError, ValueError) as e:  # ArrowInvalid is a ValueError: no such column, not a table
        raise BatchInputError(f"{user}: cannot read column {column!r} ({str(e).splitlines()[0]}); "
                              "name the column of paths with --path-column") from None
    base = fs_path.rsplit("/", 1)[0]
    paths = [str(p) for p in table.column(column).to_pylist() if p]
    return [src.to_fs(p) if _URI.match(p) else p if p.startswith("/") else f"{base}/{p}" for p in paths]


def _expand(src: Source, item: str, path_column: str, recursive: bool) -> list[str]:
    import pyarrow.fs as pafs

    fs_path = src.to_fs(item)
    if _GLOB.search(fs_path):
        found = _glob(src, fs_path)
        if not found:
            raise BatchInputError(f"{item}: the pattern matches no file")
        return found
    info = src.info(fs_path)
    if info.type == pafs.FileType.Directory:
        found = _listing(src, fs_path, recursive)
        if not found:
            raise BatchInputError(f"{item}: directory holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        return found
    lower = fs_path.lower()
    if info.type == pafs.FileType.File and lower.endswith(LIST_SUFFIXES):
        return _list_file(src, fs_path, item)
    if info.type == pafs.FileType.File and lower.endswith(TABLE_SUFFIXES):
        return _table(src, fs_path, item, path_column)
    if info.type == pafs.FileType.NotFound and lower.endswith(LIST_SUFFIXES + TABLE_SUFFIXES):
        raise BatchInputError(f"{item}: no such file")
    return [fs_path]  # one image file (checked with the rest below)


def _checked(src: Source, fs_paths: list[str]) -> list[Item]:
    """Items in order, each path once; a path that is not a readable regular file carries its error."""
    import pyarrow.fs as pafs

    unique = list(dict.fromkeys(fs_paths))
    out = []
    for fs_path, info in zip(unique, src.fs.get_file_info(unique)):
        error = None
        if info.type == pafs.FileType.NotFound:
            error = "no such image file"
        elif info.type != pafs.FileType.File:
            error = "not a regular file, not an image file"
        elif not src.scheme and not os.access(fs_path, os.R_OK):
            error = "cannot open: permission denied"
        user = src.to_user(fs_path)
        out.append(Item(user, fs_path, f"{user}: {error}" if error else None))
    return out


def list_inputs(inputs: Iterable[str], path_column: str = "path", recursive: bool = False) -> tuple[Source, list[Item]]:
    """(the filesystem, every image to caption) of the command's inputs; BatchInputError if any input is unusable."""
    inputs = [str(i) for i in inputs]
    if not inputs:
        raise BatchInputError("nothing to caption: give a directory, a glob, a text file of paths or a table")
    src = Source(inputs[0])
    paths: list[str] = []
    for item in inputs:
        if _scheme(item) != src.scheme:
            raise BatchInputError(f"{item}: on another filesystem than {inputs[0]}; one job reads one")
        try:
            paths += _expand(src, item, path_column, recursive)
        except OSError as e:
            raise BatchInputError(f"{item}: {e.strerror or e}") from None
    return src, _checked(src, paths)

