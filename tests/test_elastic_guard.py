"""The guard of an elastic worker (trainer/backends/elastic_guard.py), on stand-in workers:
it ends a worker that stays silent while another worker's collective has failed, and only
then; it passes signals on and exits with the worker's status."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from trainer.backends import elastic_guard, heartbeat
from trainer.backends.heartbeat import host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# At a 10 s timeout: a heartbeat every second, silent after 3 s.
TIMEOUT_SECONDS = 10.0


@pytest.mark.parametrize(
    ("last_heard", "marks_seen_at", "now", "ended"),
    [
        (100.0, [], 110.0, False),  # silent, but no one waits for it: a pause
        (100.0, [99.0], 110.0, False),  # the mark came before its silence
        (100.0, [float("-inf"), 101.0], 110.0, True),
        (100.0, [101.0], 102.5, False),  # silent for less than 3 s so far
        (100.0, [101.0], 103.5, True),
    ],
)
def test_a_worker_is_ended_only_if_silent_since_before_a_mark(
    last_heard, marks_seen_at, now, ended
):
    assert elastic_guard.abandoned(last_heard, marks_seen_at, 3.0, now) == ended


def start_guarded(tmp_path, then: str) -> tuple[subprocess.Popen, psutil.Process]:
    """A guard over a stand-in worker that starts its heartbeat, tells the guard, and
    then runs `then`; returns (guard, worker) once the worker has told."""
    worker = tmp_path / "worker.py"
    worker.write_text(
        textwrap.dedent(
            f"""
            import os, signal, sys, time
            sys.path.insert(0, {ROOT!r})
            from trainer.backends import elastic_guard, heartbeat
            name = heartbeat.elastic_name()
            beat = heartbeat.start({str(tmp_path)!r}, 0, {TIMEOUT_SECONDS}, name=name)
            elastic_guard.tell_guard({str(tmp_path)!r}, beat.path, beat.silent_after)
            """
        )
        + textwrap.dedent(then)
    )
    guard = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from trainer.backends.elastic_guard import Guard; "
            f"sys.exit(Guard([sys.executable, {str(worker)!r}]).run())",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    folder = tmp_path / heartbeat.FOLDER
    deadline = time.time() + 30
    while not list(folder.glob("elastic-*.json")):
        assert guard.poll() is None and time.time() < deadline, guard.communicate()
        time.sleep(0.1)
    (child,) = psutil.Process(guard.pid).children()
    return guard, child


def test_a_silent_worker_is_ended_once_another_worker_marks_a_reset(tmp_path):
    """Stopped for good (SIGSTOP): left alone while no one waits for it, ended by its
    guard within a poll of another worker's mark; the guard exits as a killed worker."""
    guard, worker = start_guarded(
        tmp_path, "time.sleep(1.5)\nos.kill(os.getpid(), signal.SIGSTOP)\n"
    )
    try:
        time.sleep(1.5 + 3 + 2)  # stopped, and silent for longer than 3 s
        assert worker.status() == psutil.STATUS_STOPPED
        assert guard.poll() is None  # a pause: survived
        heartbeat.mark_reset(str(tmp_path))  # another worker's collective failed
        marked = time.time()
        status = guard.wait(timeout=10)
        ended_after = time.time() - marked
    finally:
        guard.kill()
        worker.kill() if worker.is_running() else None
    stderr = guard.stderr.read()
    assert status == 128 + signal.SIGKILL, stderr
    assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE
    assert (
        f"warning: elastic: worker {worker.pid} on host {host()} did not answer (silent for "
    ) in stderr
    assert "ended by its guard" in stderr
    assert ended_after < 3, ended_after
    print(f"ended {ended_after:.1f} s after the mark")


def test_a_paused_worker_is_not_ended_nor_for_its_own_mark_and_signals_reach_it(tmp_path):
    """Its own mark (its collective failed, then it stopped) is not another's; continued,
    it beats again and a mark then ends nothing; SIGTERM to the guard reaches the worker,
    whose exit status the guard returns."""
    guard, worker = start_guarded(
        tmp_path,
        """
        signal.signal(signal.SIGTERM, lambda *_: (print("worker: SIGTERM"), sys.exit(3)))
        heartbeat.mark_reset(os.path.dirname(os.path.dirname(beat.path)))  # its own
        time.sleep(1.5)
        os.kill(os.getpid(), signal.SIGSTOP)
        while True:
            time.sleep(0.1)
        """,
    )
    try:
        time.sleep(1.5 + 3 + 2)
        assert worker.status() == psutil.STATUS_STOPPED and guard.poll() is None
        worker.send_signal(signal.SIGCONT)
        time.sleep(2)  # a heartbeat again
        heartbeat.mark_reset(str(tmp_path))
        time.sleep(3 + 2)
        assert guard.poll() is None and worker.status() != psutil.STATUS_STOPPED
        guard.send_signal(signal.SIGTERM)
        status = guard.wait(timeout=10)
    finally:
        guard.kill()
        worker.kill() if worker.is_running() else None
    stdout, stderr = guard.communicate()
    assert status == 3, stderr
    assert "worker: SIGTERM" in stdout
    assert "warning" not in stderr


def test_a_guard_killed_with_sigkill_takes_its_worker_with_it(tmp_path):
    """As a worker killed outright did before it had a guard: none is left running."""
    guard, worker = start_guarded(tmp_path, "time.sleep(120)\n")
    guard.kill()
    guard.wait(timeout=10)
    worker.wait(timeout=10)  # psutil: raises TimeoutExpired if it lives on
    assert not worker.is_running()
