"""Confined copies: how /update_model brings a directory from under the import root into the repository.

design: the admin token may name a directory to import, so the copy is built to give its holder
nothing more than the files under `import_root`: the source is resolved against the root with no
symlink on the way (`under_root`), and `copy_confined` walks it over file descriptors opened with
O_NOFOLLOW, so the tree cannot change between check and copy; it copies regular files and
directories only, within a byte, file and depth budget. The repository stages the copy and
renames it into place whole.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

#: files one import may copy
MAX_IMPORT_FILES = 10_000
#: directory levels one import may copy
MAX_IMPORT_DEPTH = 16


class Budget:
    """Bytes and files an import may still copy."""

    def __init__(self, max_bytes: int, max_files: int) -> None:
        self.bytes = max_bytes
        self.files = max_files
        self.max_bytes = max_bytes
        self.max_files = max_files

    def spend(self, nbytes: int, what: str) -> None:
        self.bytes -= nbytes
        if self.bytes < 0:
            raise ValueError(f"{what}: the import is over the {self.max_bytes}-byte limit (max_import_bytes)")


def under_root(source: str | Path, import_root: str | Path) -> Path:
    """`source` (absolute, or relative to the root) if it lies under `import_root` with no symlink on the way."""
    given_root = os.path.normpath(os.path.abspath(import_root))
    real_root = os.path.realpath(import_root)
    src = os.path.normpath(os.path.join(given_root, source))
    for base in (given_root, real_root):
        if src.startswith(base + os.sep):
            rel = os.path.relpath(src, base)
            if os.path.realpath(src) == os.path.join(real_root, rel):
                return Path(real_root, rel)
            break
    raise ValueError(f"path {str(source)!r} is not a directory under the import root, reached without symlinks")


def copy_confined(src: Path, dst: Path, budget: Budget, label: str, depth: int = 0) -> None:
    """Copy directory `src` into the existing `dst`: regular files and directories only, no links."""
    if depth > MAX_IMPORT_DEPTH:
        raise ValueError(f"{label}: directories nested deeper than {MAX_IMPORT_DEPTH} levels")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY
    try:
        dir_fd = os.open(src, flags)
    except OSError as exc:
        raise ValueError(f"{label} is not a directory on the server (or is a symlink): {exc.strerror}") from None
    try:
        for entry in os.scandir(dir_fd):
            where = f"{label}/{entry.name}"
            budget.files -= 1
            if budget.files < 0:
                raise ValueError(f"{label}: more than {budget.max_files} files")
            if entry.is_symlink():
                raise ValueError(f"{where} is a symlink; imports copy no symlinks")
            if entry.is_dir(follow_symlinks=False):
                (dst / entry.name).mkdir()
                copy_confined(src / entry.name, dst / entry.name, budget, where, depth + 1)
            elif entry.is_file(follow_symlinks=False):
                _copy_file(dir_fd, entry.name, dst / entry.name, budget, where)
            else:
                raise ValueError(f"{where} is not a regular file or directory")
    finally:
        os.close(dir_fd)


def _copy_file(dir_fd: int, name: str, dst: Path, budget: Budget, where: str) -> None:
    # The listing's checks may be stale by now (the entry swapped for a symlink or a FIFO since):
    # the open refuses a symlink itself, and does not block on a FIFO with no writer (O_NONBLOCK,
    # which regular files ignore); the type is then checked on what was opened.
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValueError(f"{where} is a symlink; imports copy no symlinks") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{where} is not a regular file")
        budget.spend(info.st_size, where)
        with open(fd, "rb", closefd=False) as fin, open(dst, "xb") as fout:
            copied = 0
            while chunk := fin.read(1 << 20):
                copied += len(chunk)
                if copied > info.st_size:  # grew while being copied
                    budget.spend(len(chunk), where)
                fout.write(chunk)
    finally:
        os.close(fd)
