"""TensorBoard output, written by the chief only (other workers get a writer that does nothing)."""

from __future__ import annotations

import contextlib

import numpy as np
import tensorflow as tf


class Summaries:
    """Scalars, histograms and text under `logdir`; a no-op when `enabled` is False."""

    def __init__(self, logdir: str, enabled: bool):
        self.enabled = enabled
        self._writer = tf.summary.create_file_writer(logdir) if enabled else None

    def _context(self, step):
        if not self.enabled:
            return contextlib.nullcontext(None)
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

    def text(self, tag: str, markdown: str, step: int = 0) -> None:
        with self._context(step) as writer:
            if writer is not None:
                tf.summary.text(tag, markdown)

    def flush(self) -> None:
        if self.enabled:
            self._writer.flush()
