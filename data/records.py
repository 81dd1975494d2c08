"""Random access to TFRecord files through an index of record offsets.

A TFRecord file is a sequence of records, each an 8-byte length, a 4-byte checksum of
it, the data and a 4-byte checksum of the data. One pass over the files (the work split
over the job's processes by file, the result cached: see data/cached_work.py) gives every
record's length and label; the offsets follow by a running sum. Training then reads a
record by its offset (`os.pread`, thread-safe and outside the GIL, so tf.data reads
many in parallel) and never holds the data set: what stays in memory is 20 bytes a
record for the index, and the labels.

Files must be uncompressed TFRecords on a file system the workers can open (a local
disk or a shared mount); a compressed file is refused by name.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading

import numpy as np
import tensorflow as tf

from data.cached_work import cached, current, fingerprint
from data.errors import InputError

RECORD_OVERHEAD = 16  # 8-byte length and its 4-byte CRC before the data, a 4-byte CRC after
HEADER = 12


def encode_example(
    image: bytes, label: int, image_key="image/encoded", label_key="image/class/label"
) -> bytes:
    """A serialized `tf.train.Example` of one encoded image and its integer label: what
    `data.sources.tfrecord` reads (write it with `tf.io.TFRecordWriter`)."""
    feature = {
        image_key: tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
        label_key: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


class OpenFiles:
    """Descriptors of at most `limit` files at once (data sets ship as thousands of shards,
    past `ulimit -n`): the least recently used idle one is closed to open another. A
    descriptor being read is never closed; while every open one is being read, the
    limit is exceeded rather than a read made to wait."""

    def __init__(self, paths, limit: int):
        if not (isinstance(limit, int) and limit >= 1):
            raise InputError(f"tfrecord.max_open_files must be a whole number >= 1, got {limit!r}.")
        self.paths, self.limit = tuple(paths), limit
        self._open = collections.OrderedDict()  # file -> [descriptor, readers now]
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def descriptor(self, f: int):
        with self._lock:
            entry = self._open.get(f)
            if entry is None:
                self._close_idle(keep=self.limit - 1)
                entry = self._open[f] = [os.open(self.paths[f], os.O_RDONLY), 0]
            self._open.move_to_end(f)
            entry[1] += 1
        try:
            yield entry[0]
        finally:
            with self._lock:
                entry[1] -= 1

    def _close_idle(self, keep: int) -> None:
        idle = [f for f, (_, readers) in self._open.items() if readers == 0]  # oldest first
        for f in idle[: max(len(self._open) - keep, 0)]:
            os.close(self._open.pop(f)[0])

    def __len__(self) -> int:
        return len(self._open)

    def close(self) -> None:
        with self._lock:
            self._close_idle(keep=0)


class RecordReader:
    """Reads record `i` of the indexed files by offset; `parse_image` takes out its image."""

    def __init__(self, files, counts, lengths, image_key: str, max_open_files: int = 64):
        self.files = tuple(files)
        self.file_of = np.repeat(np.arange(len(files), dtype=np.int32), counts)
        self.lengths = lengths.astype(np.int64)
        sizes = self.lengths + RECORD_OVERHEAD
        begins = np.cumsum(sizes) - sizes  # as if the files were one
        self.first_record = np.cumsum(counts) - counts
        file_begins = np.zeros(len(counts), np.int64)
        file_begins[counts > 0] = begins[self.first_record[counts > 0]]
        self.offsets = begins - np.repeat(file_begins, counts) + HEADER  # where the data starts
        self.image_key = image_key
        self.open_files = OpenFiles(self.files, max_open_files)

    def __len__(self) -> int:
        return len(self.lengths)

    def read(self, i) -> bytes:
        """The serialized tf.train.Example of record `i`."""
        i = int(i)
        with self.open_files.descriptor(int(self.file_of[i])) as descriptor:
            return os.pread(descriptor, int(self.lengths[i]), int(self.offsets[i]))

    def describe(self, i) -> str:
        f = self.file_of[i]
        return f"{self.files[f]} record #{int(i - self.first_record[f])}"

    def parse_image(self, serialized):
        """The encoded image of a serialized record (a TF op, for tf.data)."""
        spec = {self.image_key: tf.io.FixedLenFeature([], tf.string)}
        return tf.io.parse_single_example(serialized, spec)[self.image_key]

    def __del__(self):
        if hasattr(self, "open_files"):
            self.open_files.close()


def index_records(
    files, label_key: str, image_key: str, max_open_files: int = 64
) -> tuple[RecordReader, np.ndarray]:
    """(reader, labels) of every record of `files`, in file order.

    Each process scans every Nth file; the shares are added up and cached (data/cached_work.py).
    """
    files = list(files)
    key = fingerprint(files, "tfrecord-index", label_key)
    values = cached("tfrecord-index", key, lambda: _index_shared(files, label_key))
    counts = values[: len(files)].astype(np.int64)
    total = int(counts.sum())
    lengths = values[len(files) : len(files) + total]
    labels = values[len(files) + total :].astype(np.int64)
    reader = RecordReader(files, counts, lengths, image_key, max_open_files)
    _check_image_key(reader, image_key)
    return reader, labels


def _index_shared(files, label_key) -> np.ndarray:
    """[records per file..., every record's length..., every record's label...]."""
    work = current()
    mine = {
        f: _scan(path, label_key)
        for f, path in enumerate(files)
        if f % work.processes == work.process
    }
    counts = np.zeros(len(files))
    for f, (lengths, _) in mine.items():
        counts[f] = len(lengths)
    counts = work.sum_over_processes(counts).astype(np.int64)
    firsts = np.cumsum(counts) - counts
    total = int(counts.sum())
    rows = np.zeros((total, 2))
    for f, (lengths, labels) in mine.items():
        rows[firsts[f] : firsts[f] + counts[f]] = np.stack([lengths, labels], axis=1)
    rows = work.sum_over_processes(rows)
    return np.concatenate([counts, rows[:, 0], rows[:, 1]])


def _scan(path: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Lengths and labels of the records of one file, streamed (nothing kept but those)."""
    spec = {label_key: tf.io.FixedLenFeature([], tf.int64)}
    records = (
        tf.data.TFRecordDataset(path, buffer_size=8 << 20)
        .batch(4096)
        .map(lambda r: (tf.strings.length(r), tf.io.parse_example(r, spec)[label_key]))
    )
    lengths, labels = [], []
    try:
        for length, label in records:
            lengths.append(length.numpy())
            labels.append(label.numpy())
    except tf.errors.OpError as error:
        first_line = str(error.message).strip().splitlines()[0][:200]
        raise InputError(
            f"TFRecord file {path!r} cannot be indexed: {first_line}. It must hold "
            f"uncompressed tf.train.Examples with an int64 {label_key!r} (tfrecord.label_key)."
        ) from error
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    if int((lengths + RECORD_OVERHEAD).sum()) != os.path.getsize(path):
        raise InputError(
            f"TFRecord file {path!r} is not an uncompressed TFRecord file (its records do "
            "not add up to its size); compressed files cannot be read by offset."
        )
    return lengths, labels


def _check_image_key(reader: RecordReader, image_key: str) -> None:
    if not len(reader):
        return
    example = tf.train.Example.FromString(reader.read(0))
    if image_key not in example.features.feature:
        raise InputError(
            f"The records of {reader.files[0]!r} have no feature {image_key!r} "
            f"(tfrecord.image_key); they have {sorted(example.features.feature)}."
        )
