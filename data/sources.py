"""Labelled datasets the P×K sampler indexes: digits, image folders, TFRecords.

A `Source` holds one entry per example, in a fixed order: the pixels themselves
(digits), a file path (image folders) or a record number (TFRecords, read by offset
through an index: data/records.py), with its integer label. The sampler picks indices,
so each replica reads and decodes only the rows of its own slice, and no source holds
the encoded images in memory.

Class selection is the same everywhere: `classes=(start, stop)` keeps the classes at
positions [start, stop) of the sorted list of class names (folder names, or label
values), the usual metric-learning split (e.g. CUB-200-2011: (0, 100) to train,
(100, 200) to evaluate). Labels are those positions, so a class keeps its label in
any split.
"""

from __future__ import annotations

import dataclasses
import glob
import os

import gin
import numpy as np

from data.errors import InputError
from data.records import index_records

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


@dataclasses.dataclass(frozen=True)
class Source:
    """One dataset split: `items[i]` has label `labels[i]`."""

    name: str
    items: np.ndarray  # float32 pixels (N, H, W, C), or (N,) paths / record numbers
    labels: np.ndarray  # int32 (N,)
    kind: str  # "pixels", "file" or "record"
    class_names: tuple
    reader: object = None  # kind "record": the data.records.RecordReader of the files

    def describe(self, index: int) -> str:
        """The file (and record) of example `index`, for messages."""
        if self.kind == "record":
            return self.reader.describe(self.items[index])
        return str(self.items[index]) if self.kind == "file" else f"example #{index}"

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(np.unique(self.labels))


def select_classes(names, classes, what: str) -> list[int]:
    """Positions [start, stop) of the sorted `names`; a clear error when out of range."""
    if classes is None:
        return list(range(len(names)))
    start, stop = classes
    if not 0 <= start < stop <= len(names):
        raise InputError(
            f"classes={tuple(classes)} is not a range within the {len(names)} classes of "
            f"{what} (positions 0..{len(names)})."
        )
    return list(range(start, stop))


@gin.configurable
def digits(classes=(0, 6)) -> Source:
    """scikit-learn's 8×8 digits (1797 images, shipped with the library, no download).

    The default protocol trains on classes 0-5 and evaluates retrieval on 6-9.
    """
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    names = [str(c) for c in range(10)]
    keep = np.isin(labels, select_classes(names, classes, "digits"))
    pixels = (images[keep] / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    return Source(
        f"digits{tuple(classes)}", pixels, labels[keep].astype(np.int32), "pixels", tuple(names)
    )


@gin.configurable
def image_folder(root=gin.REQUIRED, classes=None) -> Source:
    """One subfolder per class (CUB-200-2011, Cars196, SOP, face sets), sorted by name."""
    if not os.path.isdir(root):
        raise InputError(f"image_folder.root {root!r} is not a folder.")
    names = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not names:
        raise InputError(f"image_folder.root {root!r} has no class subfolders.")
    paths, labels = [], []
    for position in select_classes(names, classes, f"image folder {root!r}"):
        folder = os.path.join(root, names[position])
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise InputError(
                f"Class folder {folder!r} holds no images (extensions {IMAGE_EXTENSIONS})."
            )
        paths += [os.path.join(folder, f) for f in files]
        labels += [position] * len(files)
    return Source(
        f"image_folder({root})",
        np.array(paths, dtype=object),
        np.array(labels, np.int32),
        "file",
        tuple(names),
    )


@gin.configurable
def tfrecord(
    pattern=gin.REQUIRED,
    classes=None,
    image_key="image/encoded",
    label_key="image/class/label",
    max_open_files: int = 64,
) -> Source:
    """Uncompressed TFRecord files of tf.train.Examples with an encoded image and an
    integer label, read by offset: memory does not grow with the data set.

    The first start indexes the files (one pass, split over the job's processes,
    cached: data/records.py); later starts read the index back. At most
    `max_open_files` shards are open at once (least recently used closed first), well
    under the usual `ulimit -n` of 1024 even with thousands of shards.
    """
    files = sorted(glob.glob(pattern))
    if not files:
        raise InputError(f"tfrecord.pattern {pattern!r} matches no file.")
    reader, values = index_records(files, label_key, image_key, max_open_files)
    if not len(values):
        raise InputError(f"tfrecord.pattern {pattern!r}: the files hold no records.")
    names = np.unique(values)
    keep_positions = select_classes(names, classes, f"TFRecords {pattern!r}")
    position = np.searchsorted(names, values)
    keep = np.isin(position, keep_positions)
    return Source(
        f"tfrecord({pattern})",
        np.flatnonzero(keep).astype(np.int64),
        position[keep].astype(np.int32),
        "record",
        tuple(str(n) for n in names),
        reader,
    )


@gin.configurable
def list_file(
    root=gin.REQUIRED,
    listing=gin.REQUIRED,
    path_column: int = 0,
    label_column: int = 1,
    delimiter: str | None = None,
    skip_header: int = 0,
    keep_column: int | None = None,
    keep_values: tuple = (),
) -> Source:
    """Images listed in a text or CSV file, with paths relative to `root`: how Stanford
    Online Products (`Ebay_train.txt`), In-Shop (`list_eval_partition.txt`) and many
    others ship, with one folder per super-category rather than per class.

    Each line after the first `skip_header` lines (True: 1) is split on `delimiter` (None:
    any whitespace; ',' for CSV) into columns, counted from 0. The label of an example is
    its listed class id when the ids are whole numbers (so published ids keep their
    meaning), else the id's position among the sorted distinct ids of the listing (e.g.
    In-Shop's 'id_00000001'). `keep_column`/`keep_values` keep only the lines whose column
    holds one of the values (In-Shop's 'train', or 'query' and 'gallery'). Every listed
    path must exist: a missing one is named at start-up.
    """
    listing_path = listing if os.path.isabs(listing) else os.path.join(root, listing)
    if not os.path.isfile(listing_path):
        raise InputError(f"list_file.listing {listing_path!r} is not a file.")
    skip = int(skip_header)
    paths, ids = [], []
    needed = max(path_column, label_column, -1 if keep_column is None else keep_column)
    with open(listing_path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if number <= skip or not line.strip():
                continue
            columns = [c.strip() for c in line.rstrip("\n").split(delimiter)]
            if len(columns) <= needed:
                raise InputError(
                    f"{listing_path} line {number} has {len(columns)} column(s), but "
                    f"list_file reads column {needed} (columns count from 0; delimiter "
                    f"{delimiter!r}, skip_header={skip_header}): {line.strip()[:120]!r}"
                )
            if keep_column is not None and columns[keep_column] not in keep_values:
                continue
            paths.append(os.path.join(root, columns[path_column]))
            ids.append(columns[label_column])
    if not paths:
        raise InputError(f"list_file: {listing_path} lists no image (after the filters).")
    labels, names = _class_ids(ids)
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise InputError(
            f"{len(missing)} image(s) listed in {listing_path} do not exist under "
            f"list_file.root {root!r}: {shown}."
        )
    return Source(
        f"list_file({listing_path})", np.array(paths, dtype=object), labels, "file", names
    )


def _class_ids(ids: list[str]) -> tuple[np.ndarray, tuple]:
    """Labels and class names (indexed by label) of listed class ids."""
    try:
        numbers = np.array([int(i) for i in ids], np.int64)
    except ValueError:
        names, labels = np.unique(np.array(ids, dtype=object), return_inverse=True)
        return labels.astype(np.int32), tuple(str(n) for n in names)
    if numbers.min() < 0:
        raise InputError(f"list_file: class ids must be >= 0, found {int(numbers.min())}.")
    return numbers.astype(np.int32), tuple(str(i) for i in range(int(numbers.max()) + 1))
