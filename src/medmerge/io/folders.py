"""Output folders written whole or not at all, by one process at a time.

- `atomic_folder` hands out a temporary folder beside the destination and renames it into place
  only when everything inside is written and synced to disk.
- `locked`: one writer per destination (a lock file beside it, dropped by the kernel when its
  process dies), re-entrant for the thread that holds it; `sweep` and `remove_leftovers` remove
  what killed writers left.
- `refuse_output_near`: an output may never be, hold or lie inside an input, links followed.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from medmerge.errors import MergeError


@contextmanager
def atomic_folder(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out_dir`; on success its files are synced to disk and
    it replaces `out_dir` by renaming. One process at a time writes a destination (`locked`);
    what a killed writer left beside it is removed first (`sweep`). An `out_dir` that is a
    link to a folder is that folder."""
    out = _output_path(out_dir)
    if out.exists() and not out.is_dir():
        raise MergeError(f"output path {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MergeError(f"output folder {out} is not empty; pass --overwrite to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise MergeError(f"output folder {out}: {out.parent} is not a folder") from e
    stages = holds(out)  # a multi-document merge's final stage: its stages' folder is live
    with locked(out):
        remove_leftovers(out, stages=not stages)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
        try:
            yield tmp
            _sync(tmp)
            if out.is_dir() and any(out.iterdir()) and not overwrite:
                raise MergeError(
                    f"output folder {out} appeared while this merge ran; pass --overwrite to "
                    "replace it"
                )
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if out.exists():
            old = out.with_name(f".{out.name}.tmp-old-{uuid.uuid4().hex[:8]}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
        _sync_folder(out.parent)


def _output_path(out_dir: str | os.PathLike) -> Path:
    """The output folder as the system will write it: absolute, every link on the way followed
    (one that leads nowhere is refused)."""
    out = Path(os.path.abspath(out_dir))
    if out.is_symlink() and not out.exists():
        raise MergeError(f"output folder {out} is a link to {os.readlink(out)}, which does "
                         "not exist; give a folder, or a link to one")  # fmt: skip
    return Path(os.path.realpath(out))


def refuse_output_near(out_dir: str | os.PathLike, inputs, what: str = "output folder",
                       contains: bool = True) -> None:  # fmt: skip
    """Refuse an output (`what`) that is, lies inside or (with `contains`) contains one of the
    folders `inputs`, links followed: replacing it would delete them, writing into it would
    change them."""
    target = _output_path(out_dir)
    for folder in sorted({Path(f) for f in inputs}):
        real = Path(os.path.realpath(folder))
        where = (
            "is" if real == target
            else "contains" if contains and real.is_relative_to(target)
            else "lies inside" if target.is_relative_to(real)
            else None
        )  # fmt: skip
        if where:
            raise MergeError(
                f"{what} {out_dir} {where} the input {folder}; write to a folder apart from the "
                "inputs"
            )


LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?:tmp-[^.]*|parts-[^.]*|lock)")


def remove_leftovers(target: Path, stages: bool = True) -> None:
    """Remove the temporary folders that writers of `target` killed before they finished left
    beside it (`.NAME.tmp-*`, and with `stages` a multi-document merge's `.NAME.parts-*`); the
    caller holds `target`'s lock."""
    target = Path(os.path.abspath(target))
    for pattern in [f".{target.name}.tmp-*"] + [f".{target.name}.parts-*"] * stages:
        for stale in target.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


def sweep(folder: Path) -> None:
    """Remove what killed writers left in `folder`: temporary folders of outputs no process
    is writing, and their lock files (a live writer's are kept)."""
    names = {m["name"] for p in folder.glob(".*") if (m := LEFTOVER.fullmatch(p.name))}
    for name in sorted(names):
        try:
            with locked(folder / name):  # released: the lock file is removed too
                remove_leftovers(folder / name)
        except MergeError:
            continue  # being written now


def _sync(folder: Path) -> None:
    """Flush every file under `folder`, then the folders, to disk: a folder renamed into place
    after a power loss then holds whole files."""
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file() and not path.is_symlink():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        elif path.is_dir():
            _sync_folder(path)
    _sync_folder(folder)


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_HELD: dict[Path, tuple[int, int]] = {}  # lock files held here: (thread, times taken)


def _lock_path(target: str | os.PathLike) -> Path:
    target = Path(os.path.abspath(target))
    return target.parent / f".{target.name}.lock"


def holds(target: str | os.PathLike) -> bool:
    """Whether this thread holds the lock of `target`."""
    return _HELD.get(_lock_path(target), (None,))[0] == threading.get_ident()


@contextmanager
def locked(target: Path, wait: bool = False) -> Iterator[None]:
    """Hold the lock of `target` (a file `.NAME.lock` beside it, holding the owner's pid): a
    second writer gets an error naming the first, or with `wait` waits for it. The kernel drops
    the lock of a process that dies, so a lock is never stale; the thread that holds a lock may
    take it again (a multi-document merge's final stage)."""
    target, path = Path(os.path.abspath(target)), _lock_path(target)
    me = threading.get_ident()
    if holds(target):
        _HELD[path] = (me, _HELD[path][1] + 1)
        try:
            yield
        finally:
            _HELD[path] = (me, _HELD[path][1] - 1)
        return
    fd = _lock_file(path, target, wait)
    _HELD[path] = (me, 1)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        del _HELD[path]
        path.unlink(missing_ok=True)
        os.close(fd)


def _lock_file(path: Path, target: Path, wait: bool) -> int:
    """An open descriptor of lock file `path`, locked by this process."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            if not wait:
                os.close(fd)
                raise MergeError(
                    f"{target} is being written by another medmerge process (pid {owner}); wait "
                    "for it to finish, or write elsewhere"
                ) from None
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # the file may have been unlinked by its last owner between open and lock
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
