"""Each worker's sign of life, so a collective that times out can name who did not answer.

A collective that waits too long only knows that it waited: Gloo says "Timed out waiting
600000ms for recv operation", NCCL and TensorFlow's collectives say less. So every
process of a multi-process job writes `<workdir>/heartbeats/worker-<rank>.json` (its
rank, host, process id, the step it is at and the time) from a thread every few seconds
and when its step changes (at most once a second).
After a timeout the worker that noticed reads them: a worker whose file stopped changing
(stopped, swapping, its host gone), whose process on this host is gone, or that is
behind the others' step is the one that did not answer. The workdir is on storage every
node shares (checkpoints need it), so the files are seen from every host.

The same thread is the job's watchdog where a backend has none: Horovod on Gloo waits for
ever on a worker whose main thread hung while its Horovod thread lives (it goes on
answering Horovod's negotiation, so neither Gloo's timeout nor the stall shutdown fires).
A process whose main thread has waited on TensorFlow (its collectives, or reading their
results) with no progress for longer than the timeout calls `on_stall`, which ends the
job naming who did not answer. A process stuck in anything else is the stuck one, not a
waiter: it says nothing, and the others name it.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import sys
import threading
import time

FOLDER = "heartbeats"


def interval_for(timeout_seconds: float) -> float:
    """Seconds between heartbeats: a tenth of the timeout, between 1 and 15 s (a stopped
    worker is then long silent when the timeout fires; a shared disk is not hammered)."""
    return min(15.0, max(1.0, timeout_seconds / 10))


def silent_after(timeout_seconds: float) -> float:
    """Seconds without a heartbeat after which a worker is taken to have stopped: three
    intervals."""
    return 3 * interval_for(timeout_seconds)


def stall_after(timeout_seconds: float) -> float:
    """Seconds without progress before the watchdog acts: the timeout and a tenth more
    (5 to 60 s), so that a backend's own timeout, which says more, fires first."""
    return timeout_seconds + min(60.0, max(5.0, timeout_seconds / 10))


class Heartbeat:
    """Writes this worker's heartbeat file from a daemon thread until the process ends,
    and calls `on_stall` (once) if the main thread waits on TensorFlow with no progress
    for `stall_after(timeout_seconds)` while the watch is on (see `at_step`)."""

    def __init__(self, workdir: str, rank: int, timeout_seconds: float, on_stall=None, name=None):
        self.folder = os.path.join(workdir, FOLDER)
        self.rank = rank
        self.name = name or f"worker-{rank}"  # the file's name, without .json
        self.path = os.path.join(self.folder, f"{self.name}.json")
        self.interval = interval_for(timeout_seconds)
        self.silent_after = silent_after(timeout_seconds)
        self.stall_after = stall_after(timeout_seconds)
        self.on_stall = on_stall
        self.progress_at: float | None = None  # monotonic time of the last progress; None: off
        self.step = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        os.makedirs(self.folder, exist_ok=True)
        self._write()  # at once: a worker that never gets further is seen to have started
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _beat(self) -> None:
        """A heartbeat every `interval`, and within a second of a new step (so the step
        a silent worker was last heard at is the one it stopped in)."""
        written_step, written_at = self.step, time.monotonic()
        while not self._stop.wait(min(1.0, self.interval)):
            if self._stalled():
                self.on_stall()
                return
            if self.step == written_step and time.monotonic() - written_at < self.interval:
                continue
            written_step, written_at = self.step, time.monotonic()
            try:
                self._write()
            except OSError:
                pass  # a full or unreachable disk: the job's own writes report it

    def _stalled(self) -> bool:
        progress_at = self.progress_at
        return (
            self.on_stall is not None
            and progress_at is not None
            and time.monotonic() - progress_at > self.stall_after
            and main_thread_waits_on_tensorflow()
        )

    def _write(self) -> None:
        record = {
            "rank": self.rank,
            "host": host(),
            "pid": os.getpid(),
            "step": self.step,
            "time": time.time(),
            "doing": main_thread_doing(),
        }
        _write_atomically(self.path, record)


def _write_atomically(path: str, record: dict) -> None:
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as file:
        json.dump(record, file)
    os.replace(temporary, path)  # never read half-written


_CURRENT: list[Heartbeat] = []  # this process's heartbeat, once the job has started one


def start(workdir: str, rank: int, timeout_seconds: float, on_stall=None, name=None) -> Heartbeat:
    stop()
    _CURRENT.append(Heartbeat(workdir, rank, timeout_seconds, on_stall, name).start())
    return _CURRENT[0]


def host() -> str:
    return socket.gethostname()


def elastic_name() -> str:
    """An elastic worker's heartbeat file name: by host and process, since its rank
    changes whenever the workers do."""
    return f"elastic-{host()}-{os.getpid()}"


def mark_reset(workdir: str) -> None:
    """Marks, in the shared heartbeat folder, that this elastic worker's collective
    failed and it is going to the rendezvous: the guard of a silent worker, on any node,
    then ends it (trainer/backends/elastic_guard.py)."""
    folder = os.path.join(workdir, FOLDER)
    os.makedirs(folder, exist_ok=True)
    _write_atomically(
        os.path.join(folder, f"reset-{host()}-{os.getpid()}.json"),
        {"host": host(), "pid": os.getpid(), "time": time.time()},
    )


def reset_marks(workdir: str) -> list[tuple[str, int, float]]:
    """The marks of `mark_reset`: (host, pid, time) of each worker's latest one."""
    return [
        (mark.get("host"), mark.get("pid"), mark.get("time"))
        for mark in _records(workdir, "reset-*.json")
    ]


def stop() -> None:
    while _CURRENT:
        _CURRENT.pop().stop()


def at_step(step: int) -> None:
    """Records the step this worker is at (written with its next heartbeat), and that it
    made progress: the watchdog is on from the first step until `idle()`."""
    for heartbeat in _CURRENT:
        heartbeat.step = step
        heartbeat.progress_at = time.monotonic()


def progress() -> None:
    """Records progress within a step (a chunk of a long evaluation), so that only a
    wait, not long work, counts against the timeout."""
    for heartbeat in _CURRENT:
        if heartbeat.progress_at is not None:
            heartbeat.progress_at = time.monotonic()


def idle() -> None:
    """Turns the watchdog off (the steps are over: the export is the chief's alone)."""
    for heartbeat in _CURRENT:
        heartbeat.progress_at = None


def current_step() -> int | None:
    return _CURRENT[0].step if _CURRENT else None


def read(workdir: str, workers: int) -> list[dict]:
    """The heartbeats of ranks 0..workers-1 that exist (another run's higher ranks are
    ignored)."""
    records = [r for r in _records(workdir, "worker-*.json") if 0 <= r.get("rank", -1) < workers]
    return sorted(records, key=lambda record: record["rank"])


def _records(workdir: str, pattern: str) -> list[dict]:
    """The heartbeat records of the files matching `pattern` (unreadable ones skipped)."""
    records = [read_record(path) for path in glob.glob(os.path.join(workdir, FOLDER, pattern))]
    return [record for record in records if record is not None]


def read_record(path: str) -> dict | None:
    """A heartbeat file's record, or None if it is missing or unreadable."""
    try:
        with open(path) as file:
            record = json.load(file)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def unanswering(
    workdir: str, workers: int, me: int, timeout_seconds: float, now: float | None = None
) -> list[str]:
    """Who did not answer, as "rank R on host H (why)", judged from the heartbeats.

    First the workers that fell silent (no heartbeat for three intervals), never wrote
    one, or whose process on this host is gone; if none, those behind the furthest step
    (alive but stuck, e.g. in a slow write); if none, every other worker with what its
    main thread was doing (the one stuck outside the collective shows it).
    """
    now = time.time() if now is None else now
    silent_for = silent_after(timeout_seconds)
    records = {record["rank"]: record for record in read(workdir, workers)}
    here = host()
    named = []
    for rank in range(workers):
        if rank == me:
            continue
        record = records.get(rank)
        if record is None:
            named.append(f"rank {rank} (never started: no heartbeat)")
            continue
        where = f"rank {rank} on host {record['host']}"
        if record["host"] == here and not _alive(record["pid"]):
            named.append(f"{where} (its process {record['pid']} is gone)")
        elif now - record["time"] > silent_for:
            named.append(
                f"{where} (silent for {now - record['time']:.0f} s; last heard at step "
                f"{record['step']})"
            )
    if named:
        return named
    furthest = max((record["step"] for record in records.values()), default=0)
    behind = [
        f"rank {rank} on host {record['host']} (still at step {record['step']}, "
        f"the others at {furthest}; {record.get('doing', '?')})"
        for rank, record in records.items()
        if rank != me and record["step"] < furthest
    ]
    if behind:
        return behind
    # Alive and at the same step, yet one did not take part: say what each was doing.
    return [
        f"rank {rank} on host {record['host']} (alive at step {record['step']}; "
        f"{record.get('doing', '?')})"
        for rank, record in records.items()
        if rank != me
    ]


_PROJECT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _own(filename: str) -> bool:
    """Whether `filename` is the project's own code (not a package installed in a venv
    inside the checkout)."""
    return filename.startswith(_PROJECT + os.sep) and "site-packages" not in filename


def main_thread_doing() -> str:
    """Where this process's main thread is: its innermost frame, and the innermost one
    of the project's own code if that is another ("in sleep (hang.py:4) from
    trainer/loop.py:380"). A worker that is alive but stuck is found by this."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return "main thread ended"
    innermost, own = frame, None  # walked without reading any source (once a second)
    while frame is not None and own is None:
        if _own(frame.f_code.co_filename):
            own = frame
        frame = frame.f_back
    said = f"in {innermost.f_code.co_name} ({_place(innermost)})"
    if own is not None and own is not innermost:
        said += f" from {_place(own)}"
    return said


_WAITING_IN = (os.sep + "tensorflow" + os.sep, os.sep + "horovod" + os.sep)


def main_thread_waits_on_tensorflow() -> bool:
    """Whether the main thread is in TensorFlow's or Horovod's code (running ops, reading
    a result, in a collective), judged from its frames inside the project's own
    innermost one. A hang elsewhere (a sleep, a file write in Python, a signal handler)
    is this worker's own."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    while frame is not None and not _own(frame.f_code.co_filename):
        if any(part in frame.f_code.co_filename for part in _WAITING_IN):
            return True
        frame = frame.f_back
    return False


def _place(frame) -> str:
    """file:line, the file relative to the project if it is the project's own."""
    filename = frame.f_code.co_filename
    if _own(filename):
        filename = os.path.relpath(filename, _PROJECT)
    else:
        filename = os.path.basename(filename)
    return f"{filename}:{frame.f_lineno}"


def _alive(pid: int) -> bool:
    """Whether process `pid` of this host still runs (a zombie, dead but not yet
    reaped by its launcher, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
