"""Reading an example's bytes again, slowly and carefully, when the fast path failed.

The pipelines read and decode in tf.data, where a failure only drops the row. A dropped
row is then read here, in Python, to tell the two causes apart:

- an **I/O error** (EIO, ESTALE, EMFILE, a permission error: the storage, not the image)
  is retried with exponential backoff, `data_io.retries` times from
  `data_io.backoff_seconds`. If it persists the job stops with `DataIOError` (exit 2)
  naming the file and the OS error. It is never taken for a corrupt image, so never
  cached as one;
- **bytes that were read and do not decode** are a corrupt image (the caller's verdict).
"""

from __future__ import annotations

import dataclasses
import time

import gin

from data.errors import InputError


class DataIOError(InputError):
    """An example's bytes could not be read, retries included."""


@dataclasses.dataclass(frozen=True)
class Retries:
    retries: int = 3
    backoff_seconds: float = 0.5


_settings = Retries()


@gin.configurable("data_io")
def configure(retries: int = 3, backoff_seconds: float = 0.5) -> Retries:
    """Sets how reads are retried (called once per job, so its bindings count as read)."""
    global _settings
    if not (isinstance(retries, int) and not isinstance(retries, bool) and retries >= 0):
        raise InputError(f"data_io.retries must be a whole number >= 0, got {retries!r}.")
    if not (isinstance(backoff_seconds, int | float) and backoff_seconds >= 0):
        raise InputError(f"data_io.backoff_seconds must be >= 0, got {backoff_seconds!r}.")
    _settings = Retries(retries, float(backoff_seconds))
    return _settings


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def raw_bytes(source, index: int) -> bytes:
    """The bytes of example `index` as stored (a file's, or a record's serialized
    Example), retried on I/O errors; raises DataIOError when they persist."""
    item = source.items[index]
    settings = _settings
    began = time.time()
    for attempt in range(settings.retries + 1):
        try:
            if source.kind == "record":
                return source.reader.read(item)
            return _read_file(str(item))
        except OSError as error:
            if attempt == settings.retries:
                raise DataIOError(
                    f"cannot read {source.describe(index)}: {error.strerror or error} (errno "
                    f"{error.errno}), {settings.retries + 1} attempts over "
                    f"{time.time() - began:.1f} s (data_io.retries, data_io.backoff_seconds). "
                    "The storage failed, not the image: check it and run the same command."
                ) from error
            time.sleep(settings.backoff_seconds * 2**attempt)
    raise AssertionError("unreachable")


def encoded_image(source, raw: bytes):
    """The encoded image inside `raw_bytes` (a record's image feature, or the file)."""
    if source.kind == "record":
        return source.reader.parse_image(raw)
    return raw
