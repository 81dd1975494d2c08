"""The job's data: the training and evaluation sources, checked once, and the P×K sampler.

Indexing and the start-up image check are split over the job's processes and cached
(data/cached_work.py), so a restart over millions of images costs seconds.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data import cached_work, reading
from data.errors import InputError
from data.pipeline import corrupt_policy, preprocessing_for, verify_images
from data.sampler import PKSampler
from data.sources import Source, digits
from trainer.retrieval.verification import read_pairs


@dataclasses.dataclass
class JobData:
    train_source: Source
    eval_source: Source
    gallery_source: Source | None  # evaluation.gallery: the eval source's queries rank it
    eval_pairs: np.ndarray | None  # evaluation.pairs: (row, row, same) of the eval source
    sampler: PKSampler
    train_preprocessing: object  # images.* or pixels.*, by the kind of source
    eval_preprocessing: object
    on_corrupt: str  # verify_images.on_corrupt: what an image unreadable later does
    corrupt: int  # images left out at start-up because they could not be decoded


def load_data(
    workdir: str,
    replicas,
    train_data,
    eval_data,
    global_batch_size: int,
    examples_per_class: int,
    seed: int,
    say,
    gallery=None,
    pairs_file: str | None = None,
) -> JobData:
    """Builds the configured sources (digits 0-5 / 6-9 when none is), the evaluation's
    gallery and pairs if it has them, and the sampler: every mistake in them is found
    before anything is written."""
    on_corrupt = corrupt_policy()
    reading.configure()  # data_io.*: how a failed read is retried
    with cached_work.using(_shared_work(workdir, replicas)):
        train_source = (train_data or (lambda: digits(classes=(0, 6))))()
        eval_source = (eval_data or (lambda: digits(classes=(6, 10))))()
        train_source, corrupt = verify_images(train_source, log=say)
        eval_source, corrupt_eval = verify_images(eval_source, log=say)
        gallery_source = None
        if gallery is not None:
            gallery_source, corrupt_gallery = verify_images(gallery(), log=say)
            corrupt_eval = corrupt_eval + corrupt_gallery
    for setting, source in (
        ("train.eval_data", eval_source),
        ("evaluation.gallery", gallery_source),
    ):
        if source is not None and not len(source):
            raise InputError(f"{setting}: {source.name} holds no examples to evaluate.")
    for name in (corrupt + corrupt_eval)[:5]:
        say(f"  skipped corrupt image {name}")
    if corrupt or corrupt_eval:
        say(f"skipped {len(corrupt)} corrupt training and {len(corrupt_eval)} eval images")
    eval_pairs = read_pairs(pairs_file, eval_source) if pairs_file else None
    sampler = PKSampler(
        train_source.labels, global_batch_size // examples_per_class, examples_per_class, seed
    )
    say(
        f"data: train {train_source.name}: {len(train_source)} examples, "
        f"{train_source.num_classes} classes; eval {eval_source.name}: {len(eval_source)} "
        f"examples, {eval_source.num_classes} classes"
        + (
            f" (queries); gallery {gallery_source.name}: {len(gallery_source)} examples, "
            f"{gallery_source.num_classes} classes"
            if gallery_source is not None
            else ""
        )
    )
    if sampler.skipped_classes:
        say(
            f"  {sampler.skipped_classes} classes have fewer than {examples_per_class} examples "
            "and are never sampled"
        )
    return JobData(
        train_source=train_source,
        eval_source=eval_source,
        gallery_source=gallery_source,
        eval_pairs=eval_pairs,
        sampler=sampler,
        train_preprocessing=preprocessing_for(train_source),
        eval_preprocessing=preprocessing_for(eval_source),
        on_corrupt=on_corrupt,
        corrupt=len(corrupt) + len(corrupt_eval),
    )


def _shared_work(workdir: str, replicas) -> cached_work.SharedWork:
    """The job's processes as data/cached_work.py sees them. In an elastic job a worker may
    join later, and nobody may call a collective before the elastic loop: each worker
    then works alone (a cached result is still read back)."""
    cache_dir = cached_work.cache_directory(workdir)
    if replicas.elastic:
        return cached_work.SharedWork(cache_dir)
    return cached_work.SharedWork(
        cache_dir,
        process=replicas.rank,
        processes=replicas.size // replicas.local_replicas,
        sum_over_processes=replicas.sum_over_processes,
    )
