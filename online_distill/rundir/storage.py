"""Files on local disk or on any pyarrow filesystem URI (s3://, gs://, ...): the one place that
resolves a path to a filesystem. Which names a run writes, and when, is rundir.py's business.

Every write goes to a temporary name first and is then moved into place, so a reader never sees
half a file, and a failed write leaves nothing under the real name. An OSError that a retry
cannot fix (no space left, a read-only filesystem, a quota, no permission) becomes a
StorageError of one line naming the path, the reason and the free space, and the temporary file
is removed.
"""
from __future__ import annotations

import errno
import os
import posixpath
import shutil
import uuid

import pyarrow.fs as pafs

from ..errors import StorageError

FATAL_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EFBIG}
"""What retrying the same write cannot change."""
TEMP_MARK = ".tmp-"
"""In the name of a file being written: `name.tmp-1a2b3c4d`."""


def is_uri(path: str) -> bool:
    return "://" in path


def absolute(path: str) -> str:
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), absolute(path)


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_uri(base) else os.path.join(base, *parts)


def parent(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0] if is_uri(path) else os.path.dirname(path.rstrip(os.sep))


def basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def free_space(path: str) -> str:
    """'1.2 GiB free' on the filesystem holding path (its nearest existing ancestor), or '' where
    that cannot be known (object stores)."""
    if is_uri(path):
        return ""
    p = absolute(path)
    while p and not os.path.exists(p):
        p = os.path.dirname(p)
    try:
        free = shutil.disk_usage(p or "/").free
    except OSError:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:.0f} {unit} free" if unit == "B" else f"{free:.1f} {unit} free"
        free /= 1024
    return ""


def failure(path: str, e: OSError, doing: str = "writing") -> StorageError:
    """The one line a failed write ends a run with."""
    reason = e.strerror or str(e) or type(e).__name__
    free = free_space(path)
    return StorageError(f"storage: {doing} {path} failed: {reason} (errno {e.errno}){'; ' + free if free else ''}. "
                        "Allowed: free space, or a writable run.storage_path; the last complete checkpoint is kept "
                        "and a rerun of the same command resumes from it")


def fatal(e: BaseException) -> bool:
    """An OSError, raised anywhere (torch.save's zip writer wraps one in a RuntimeError), that a
    retry cannot fix."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in FATAL_ERRNOS:
            return True
        e = e.__cause__ or e.__context__
    return False


def exists(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def kind(path: str) -> pafs.FileType:
    fs, p = resolve(path)
    return fs.get_file_info(p).type


def read_bytes(path: str) -> bytes | None:
    fs, p = resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(p) as f:
        return f.read()


def read_text(path: str) -> str | None:
    data = read_bytes(path)
    return None if data is None else data.decode()


def write_bytes(path: str, data: bytes) -> None:
    """Write to a temporary name, then move into place; a fatal OSError is a StorageError and
    leaves neither the temporary file nor anything under the real name."""
    fs, p = resolve(path)
    tmp = f"{p}{TEMP_MARK}{uuid.uuid4().hex[:8]}"
    try:
        fs.create_dir(posixpath.dirname(p) if is_uri(path) else os.path.dirname(p), recursive=True)
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, p)
    except OSError as e:
        _remove_quietly(fs, tmp)
        if e.errno in FATAL_ERRNOS:
            raise failure(path, e) from e
        raise


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def append_text(path: str, text: str) -> None:
    """Add `text` at the end of a log file: in place on a local disk (what was there stays, whole,
    if this fails); an object store has no append, so the file is read and written again."""
    if is_uri(path):
        write_bytes(path, (read_bytes(path) or b"") + text.encode())
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


def write_file(path: str, write) -> None:
    """Write a local file through `write(tmp_path)` (torch.save, say), to a temporary name first.
    For a URI the bytes are written locally then copied up by write_bytes."""
    if is_uri(path):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="od-") as d:
            local = os.path.join(d, basename(path))
            write(local)
            with open(local, "rb") as f:
                write_bytes(path, f.read())
        return
    tmp = f"{path}{TEMP_MARK}{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, Exception) and fatal(e):
            oserror = next(x for x in _chain(e) if isinstance(x, OSError))
            raise failure(path, oserror) from e
        raise


def _chain(e: BaseException):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def _remove_quietly(fs: pafs.FileSystem, p: str) -> None:
    try:
        fs.delete_file(p)
    except OSError:
        pass


def listing(directory: str, *, files: bool) -> dict[str, int] | None:
    """Name -> size of the files (files=True) or name -> 0 of the directories in a directory;
    None when it does not exist."""
    fs, path = resolve(directory)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return None
    want = pafs.FileType.File if files else pafs.FileType.Directory
    return {i.base_name: (i.size or 0) for i in fs.get_file_info(pafs.FileSelector(path)) if i.type == want}


def make_dir(path: str) -> None:
    fs, p = resolve(path)
    try:
        fs.create_dir(p, recursive=True)
    except OSError as e:
        if e.errno in FATAL_ERRNOS:
            raise failure(path, e, "creating") from e
        raise


def delete_dir(path: str) -> None:
    fs, p = resolve(path)
    fs.delete_dir(p)


def delete_file(path: str) -> None:
    fs, p = resolve(path)
    fs.delete_file(p)


def move(src: str, dst: str) -> None:
    """Rename a file or directory (replacing a file dst) on local disk or in a pyarrow filesystem;
    an object store cannot rename a directory, so there it is copied, then removed."""
    fs, a = resolve(src)
    b = resolve(dst)[1]
    try:
        fs.move(a, b)
    except OSError:
        if not is_uri(src) or fs.get_file_info(a).type != pafs.FileType.Directory:
            raise
        pafs.copy_files(a, b, source_filesystem=fs, destination_filesystem=fs)
        fs.delete_dir(a)
