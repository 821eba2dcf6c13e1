"""Small helpers to read and write run files on local disk or any pyarrow filesystem URI."""
from __future__ import annotations

import os
import posixpath
import uuid

import pyarrow.fs as pafs


def _resolve(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if "://" in base else os.path.join(base, *parts)


def exists(path: str) -> bool:
    fs, p = _resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def read_bytes(path: str) -> bytes | None:
    fs, p = _resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(p) as f:
        return f.read()


def read_text(path: str) -> str | None:
    data = read_bytes(path)
    return None if data is None else data.decode()


def write_bytes(path: str, data: bytes) -> None:
    """Write to a temporary name, then move into place, so a reader never sees half a file."""
    fs, p = _resolve(path)
    fs.create_dir(posixpath.dirname(p) if "://" in path else os.path.dirname(p), recursive=True)
    tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, p)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def listing(directory: str, *, files: bool) -> dict[str, int] | None:
    """Name -> size of the files (files=True) or name -> 0 of the directories in a directory;
    None when it does not exist."""
    fs, path = _resolve(directory)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return None
    want = pafs.FileType.File if files else pafs.FileType.Directory
    return {i.base_name: (i.size or 0) for i in fs.get_file_info(pafs.FileSelector(path)) if i.type == want}


def delete_dir(path: str) -> None:
    fs, p = _resolve(path)
    fs.delete_dir(p)


def move(src: str, dst: str) -> None:
    """Rename a file (replacing dst) on local disk or in a pyarrow filesystem."""
    fs, a = _resolve(src)
    fs.move(a, _resolve(dst)[1])
