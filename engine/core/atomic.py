"""Outputs a later stage can trust: files and folders appear complete or not at all, with checksums to verify.

Everything is written under a hidden `.NAME.tmp-PID-RANDOM` name beside its final place, fsynced, then renamed
into place (a rename within one folder is atomic on POSIX). A killed writer leaves only the hidden temp, which
the next write to the same target removes once its PID is gone. Every stage writes through this module: the
score store, selection.json, the merged adapter, finetune adapters and logs, the run's report and timings.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator

def temp_name(target: Path) -> Path:
    """A fresh hidden sibling of `target`; the PID in the name is how stale temps are recognised."""
    return target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(target: Path) -> None:
    """Temps left beside `target` by a writer that was killed (its PID no longer runs)."""
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        pid = stale.name[len(f".{target.name}.tmp-"):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's entry list is what a rename changes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                fsync_path(p)
        fsync_path(Path(dirpath))


@contextlib.contextmanager
def atomic_dir(target: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield an empty temp folder; when the block finishes it replaces `target`, else it is removed.

    With `overwrite=False` an existing `target` raises FileExistsError before anything is written. Replacing
    an old `target` takes two renames; a crash between them leaves no `target` (never a mix of old and new).
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    tmp = temp_name(target)
    tmp.mkdir()  # umask permissions (mkdtemp's 0700 would surprise whoever reads the adapter)
    try:
        yield tmp
        _fsync_tree(tmp)
        if target.exists():
            old = temp_name(target)
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temp path to write (by any writer: parquet, torch, text); it replaces `target` if the block finishes."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    tmp = temp_name(target)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, target)
        fsync_path(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(target: str | Path, data: bytes) -> Path:
    """Write `data` so that readers see the old content or the new, never a torn file."""
    with atomic_file(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def atomic_write_text(target: str | Path, text: str) -> Path:
    """`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(target, text.encode("utf-8"))
