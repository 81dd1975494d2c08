"""TensorBoard output, written by the chief only (on other workers every call does nothing)."""

from __future__ import annotations

import contextlib

import numpy as np
import tensorflow as tf


class Summaries:
    """Scalars, histograms and text under `logdir`; a no-op while `enabled` is False.

    The events file is opened at the first write: in an elastic job a worker can become
    the chief (`enabled`) later.
    """

    def __init__(self, logdir: str, enabled: bool):
        self.logdir, self.enabled = logdir, enabled
        self._writer = None

    def _context(self, step):
        if not self.enabled:
            return contextlib.nullcontext(None)
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.logdir)
        return self._writer.as_default(step=int(step))

    def scalars(self, step: int, values: dict) -> None:
        with self._context(step) as writer:
            if writer is not None:
                for tag, value in values.items():
                    tf.summary.scalar(tag, float(value))

    def histograms(self, step: int, values: dict) -> None:
        with self._context(step) as writer:
            if writer is not None:
                for tag, value in values.items():
                    value = np.asarray(value)
                    if value.size:
                        tf.summary.histogram(tag, value)

    def image(self, tag: str, png: bytes | None, step: int) -> None:
        """A PNG (e.g. a plot) for the Images tab."""
        with self._context(step) as writer:
            if writer is not None and png is not None:
                tf.summary.image(tag, tf.io.decode_png(png, channels=3)[None], max_outputs=1)

    def text(self, tag: str, markdown: str, step: int = 0) -> None:
        with self._context(step) as writer:
            if writer is not None:
                tf.summary.text(tag, markdown)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()
