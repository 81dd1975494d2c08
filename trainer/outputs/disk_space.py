"""A write that failed for want of space (ENOSPC) or quota (EDQUOT), said plainly.

Checkpoints, summaries, exports and the data cache write through Python (OSError) or
TensorFlow's file system (ResourceExhaustedError and other OpErrors, whose message
carries the path and the OS's words). Either way the job ends with one line naming the
path, the error and the last complete checkpoint, and exit status `EXIT_STATUS`:
nothing is lost, and a rerun after freeing space resumes from that checkpoint.
"""

from __future__ import annotations

import errno
import os
import re

import tensorflow as tf

from trainer.outputs.checkpoints import last_complete

EXIT_STATUS = 4
_CODES = (errno.ENOSPC, errno.EDQUOT)
_WORDS = tuple(os.strerror(code) for code in _CODES)  # "No space left on device", ...


def out_of_space(error: BaseException) -> tuple[str | None, str] | None:
    """(path, the OS's words) if `error`, or an error it was raised from, is a write
    refused for space or quota; else None. The path is None when the error has none
    (numpy's writers give none)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _CODES:
            return error.filename and str(error.filename), os.strerror(error.errno)
        if isinstance(error, tf.errors.OpError):
            message = str(error.message if hasattr(error, "message") else error)
            for words in _WORDS:
                if words in message:
                    return _path_before(message, words), words
        error = error.__cause__ or error.__context__
    return None


def _path_before(message: str, words: str) -> str | None:
    """The path TensorFlow names before the OS's words ("/a/b.tempstate1; No space ...")."""
    before = message.split(words, 1)[0]
    paths = re.findall(r"(/[^\s;:,'\"]+)", before)
    if not paths:
        return None
    # A checkpoint is written into "<prefix>_temp/part-...tempstate123": name the prefix.
    return re.sub(r"_temp/.*$", "", paths[-1])


def message(path: str | None, words: str, workdir: str) -> str:
    """The job's last line for a write refused for space or quota."""
    last = last_complete(workdir)
    resume = (
        f"the last complete checkpoint is {last}; free space (or raise the quota) and run the "
        "same command: it resumes from there"
        if last
        else "no checkpoint was complete yet; free space (or raise the quota) and run the "
        "same command: it starts again"
    )
    where = path or f"a file under {workdir}"
    return f"{words} writing {where}: {resume}."
