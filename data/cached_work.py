"""Data preparation shared by a job's processes, and cached across starts.

Checking every image of a data set (start-up) and indexing TFRecord files are done once
per data set, not once per worker and start: each process does its share, the shares
are added up across processes (one collective), and the chief caches the result in a
file keyed to the data files' names, sizes and modification times. A restart, or
another job over the same files, reads the cache back; a file changed since gives
another key, and the work is done again.

The trainer sets the context (`using`); outside a job the default is one process and no
cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import sys
import zipfile
from collections.abc import Callable

import gin
import numpy as np

from data.errors import InputError


@dataclasses.dataclass(frozen=True)
class SharedWork:
    """Who this process is among the job's processes, and where results are cached."""

    cache_dir: str | None = None  # None: no cache
    process: int = 0
    processes: int = 1
    # Element-wise sum of a float64 array over the processes (a collective, called by all).
    sum_over_processes: Callable = np.asarray

    @property
    def is_chief(self) -> bool:
        return self.process == 0

    def share(self, count: int) -> tuple[int, int]:
        """This process's contiguous part [start, end) of `count` items."""
        bounds = np.linspace(0, count, self.processes + 1).round().astype(int)
        return int(bounds[self.process]), int(bounds[self.process + 1])

    def combine(self, count: int, start: int, part: np.ndarray) -> np.ndarray:
        """Every process's rows [start, start + len(part)) of a (count, ...) array, joined."""
        whole = np.zeros((count, *part.shape[1:]), np.float64)
        whole[start : start + len(part)] = part
        return self.sum_over_processes(whole)


_current = SharedWork()


def current() -> SharedWork:
    return _current


@contextlib.contextmanager
def using(work: SharedWork):
    """Makes `work` the context of the sources and checks built inside."""
    global _current
    previous, _current = _current, work
    try:
        yield work
    finally:
        _current = previous


@gin.configurable("data_cache")
def cache_directory(workdir: str, directory: str | None = None, enabled: bool = True):
    """Where a job caches its data checks and indexes: `data_cache.directory`, by
    default `data_cache` beside the workdir (shared by the runs under the same folder,
    on the same file system as the workdir); `enabled=False`: no cache (every start
    checks again)."""
    if not isinstance(enabled, bool):
        raise InputError(f"data_cache.enabled must be True or False, got {enabled!r}.")
    if directory is not None and not isinstance(directory, str):
        raise InputError(f"data_cache.directory must be a folder path or None, got {directory!r}.")
    if not enabled:
        return None
    return directory or os.path.join(os.path.dirname(os.path.abspath(workdir)), "data_cache")


def fingerprint(paths, *extra) -> str:
    """A key for the files `paths` as they are now: names, sizes, modification times."""
    digest = hashlib.sha1(repr(extra).encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def cached(kind: str, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """`compute()`'s 1-D float64 array, read from the cache when any process has it there.

    `compute` must be called by every process (it runs collectives), so the processes
    first agree whether anyone computes.
    """
    work = current()
    path = os.path.join(work.cache_dir, f"{kind}-{key}.npz") if work.cache_dir else None
    mine = _read(path)
    chief_has = work.is_chief and mine is not None
    missing, chief_size = work.sum_over_processes([mine is None, len(mine) if chief_has else 0])
    if missing == 0:
        return mine
    if chief_size > 0:  # the chief has it, others do not see its disk: take the chief's
        return work.sum_over_processes(mine if work.is_chief else np.zeros(int(chief_size)))
    values = np.asarray(compute(), np.float64)
    if work.is_chief and path:
        _write(path, values)
    return values


def _read(path: str | None) -> np.ndarray | None:
    """The cached values, or None if there are none or the file is torn.

    A file cut short, or with a block zeroed or changed (a copy or a shared file system
    gone wrong), fails its digest: it is named in a warning and computed again, never
    trusted (zeros where image checks were would silently pass corrupt images)."""
    if not path or not os.path.exists(path):
        return None
    try:
        with np.load(path) as stored:
            values, digest = stored["values"], str(stored["sha256"])
        if _digest(values) == digest:
            return values
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass
    print(f"warning: cache file {path} is torn; computing it again", file=sys.stderr, flush=True)
    return None


def _write(path: str, values: np.ndarray) -> None:
    """Whole or not at all: a temporary file in the same folder, then a rename. The
    values' digest goes with them (see `_read`)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "wb") as f:
        np.savez(f, values=values, sha256=np.array(_digest(values)))
    os.replace(temporary, path)


def _digest(values: np.ndarray) -> str:
    values = np.ascontiguousarray(values)
    return hashlib.sha256(
        f"{values.dtype.str}{values.shape}".encode() + values.tobytes()
    ).hexdigest()
