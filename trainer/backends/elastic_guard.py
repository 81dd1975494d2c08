"""The guard of an elastic worker: a small parent process on the worker's own node that
ends the worker once it has stopped answering while the others re-form the job.

Horovod's elastic driver re-forms a job when a worker's process exits. A worker that is
alive but silent (stopped, swapped out, hung in the kernel) never exits, so the others,
whose collective with it timed out, would wait for it at the next rendezvous for ever.
Nothing on another node can end it, but its guard can: `python -m trainer.main` in an
elastic job becomes this guard, which runs the real worker as its child. The worker
tells the guard (through a pipe) where its heartbeat file is; each worker whose
collective failed leaves a mark in the shared heartbeat folder before the rendezvous
(`heartbeat.mark_reset`). Once a mark appears while the worker's heartbeat is silent,
and the silence lasts `distribute.timeout_seconds` (at least three heartbeat intervals),
the guard ends the worker (SIGKILL) and exits as it would have died, with a warning
naming it; the driver then goes on without it, as after a death. A pause that ends
before that is survived: the worker finds its collective failed, goes to the rendezvous
too, and the job goes on from its last commit with every worker. Signals to the guard
(SIGTERM from a scheduler) go to the worker; the guard exits with the worker's status.

No TensorFlow here: the guard should cost nothing while the worker runs.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time

from trainer.backends import heartbeat

# In the guarded worker: the pipe's file descriptor, for `tell_guard`.
GUARDED = "METRIC_TRAINER_ELASTIC_GUARD_FD"
POLL_SECONDS = 1.0
# Seconds to wait for an ended worker to be gone (one hung in the kernel may never be):
# the guard exits after that anyway, which is what the driver needs.
REAP_SECONDS = 10.0
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def wanted() -> bool:
    """Whether this process should become a guard: an elastic Horovod worker that is not
    already the guarded one."""
    return os.environ.get("HOROVOD_ELASTIC") == "1" and GUARDED not in os.environ


def become_guard(module: str) -> None:
    """Replaces this process (the one horovodrun started, so the driver's handle on the
    worker stays) by the guard of `python -m module` with the same arguments."""
    os.execv(
        sys.executable,
        [sys.executable, "-m", "trainer.backends.elastic_guard", module, *sys.argv[1:]],
    )


def tell_guard(workdir: str, heartbeat_path: str, silent_after: float) -> None:
    """From the guarded worker, once its heartbeat runs: the workdir (whose heartbeat
    folder holds the marks), where the guard finds the worker's heartbeat, and how long
    a silence is waited for."""
    descriptor = os.environ.get(GUARDED)
    if descriptor is None:
        return
    told = {"workdir": workdir, "heartbeat": heartbeat_path, "silent_after": silent_after}
    with os.fdopen(int(descriptor), "w") as pipe:
        pipe.write(json.dumps(told))


def abandoned(
    last_heard: float, marks_seen_at: list[float], silent_after: float, now: float
) -> bool:
    """Whether the worker is to be ended: silent for `silent_after` now, and a mark of
    another worker's failed collective was first seen after it was last heard from (a
    rendezvous waits for it). Every time is this host's clock."""
    return now - last_heard > silent_after and any(seen > last_heard for seen in marks_seen_at)


class Guard:
    def __init__(self, command: list[str]):
        self.command = command
        self.told: dict | None = None  # what the worker said through the pipe
        # (host, pid, time) of a mark -> when this guard first saw it (this host's clock:
        # the marks come from other nodes, whose clocks may differ)
        self.marks_seen: dict[tuple[str, int, float], float] = {}
        self.worker: subprocess.Popen | None = None

    def run(self) -> int:
        read_end, write_end = os.pipe()
        self.worker = subprocess.Popen(
            self.command,
            env={**os.environ, GUARDED: str(write_end)},
            pass_fds=(write_end,),
            preexec_fn=_die_with_parent,  # the guard has no other thread yet
        )
        os.close(write_end)
        for forwarded in FORWARDED:
            signal.signal(forwarded, lambda signum, _: self.worker.send_signal(signum))
        threading.Thread(target=self._listen, args=(read_end,), daemon=True).start()
        while True:
            try:
                return _status(self.worker.wait(timeout=POLL_SECONDS))
            except subprocess.TimeoutExpired:
                pass
            last_heartbeat = self._abandoned_worker_s_heartbeat()
            if last_heartbeat is not None:
                return self._end_worker(last_heartbeat)

    def _listen(self, read_end: int) -> None:
        with os.fdopen(read_end) as pipe:
            said = pipe.read()  # until the worker closes its end (or exits)
        if said:
            told = json.loads(said)
            # Marks left before this worker began are of other resets.
            self.marks_seen = dict.fromkeys(heartbeat.reset_marks(told["workdir"]), float("-inf"))
            self.told = told

    def _abandoned_worker_s_heartbeat(self) -> dict | None:
        """The worker's last heartbeat if it is to be ended (see `abandoned`), else None."""
        if self.told is None:
            return None
        now = time.time()
        for mark in heartbeat.reset_marks(self.told["workdir"]):
            if mark[:2] != (heartbeat.host(), self.worker.pid):  # not its own
                self.marks_seen.setdefault(mark, now)
        seen_at = [seen for seen in self.marks_seen.values() if seen > float("-inf")]
        if not seen_at:  # no reset since it began: its heartbeat need not be read
            return None
        record = heartbeat.read_record(self.told["heartbeat"])
        if record is None or not abandoned(record["time"], seen_at, self.told["silent_after"], now):
            return None
        return record

    def _end_worker(self, record: dict) -> int:
        silent = time.time() - record["time"]
        self.worker.kill()
        print(
            f"warning: elastic: worker {self.worker.pid} on host {heartbeat.host()} did not "
            f"answer (silent for {silent:.0f} s at step {record['step']}) while the "
            "others re-formed the job: ended by its guard, so that the job goes on without "
            "it, as after a failure",
            file=sys.stderr,
            flush=True,
        )
        try:
            return _status(self.worker.wait(timeout=REAP_SECONDS))
        except subprocess.TimeoutExpired:
            return 128 + signal.SIGKILL


def _die_with_parent() -> None:
    """In the worker, before it runs: SIGKILL when the guard dies (Linux's
    PR_SET_PDEATHSIG), so that a guard killed with SIGKILL, as a worker used to be, leaves
    no worker running on without it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the worker outlives a killed guard
        pass


def _status(returncode: int) -> int:
    """A child's status as a shell reports it (128 + the signal that ended it)."""
    return 128 - returncode if returncode < 0 else returncode


if __name__ == "__main__":
    sys.exit(Guard([sys.executable, "-m", *sys.argv[1:]]).run())
