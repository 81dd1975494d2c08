"""`distribute.timeout_seconds`: how long a collective waits before it ends the job.

Each backend has its own clock, and their defaults disagree: Gloo gives up after 30 s (a
worker paused by a slow shared disk or a swap storm then kills a healthy job), Horovod's
NCCL path waits forever, and MultiWorkerMirrored's health check declares a peer down
after three 10 s pings. One setting, default 600 s as PyTorch's collectives, drives them
all. A collective that waits longer ends the job with one line naming the workers that
did not answer (see trainer/backends/heartbeat.py), the step and the last complete checkpoint,
and exit status `EXIT_STATUS`.
"""

from __future__ import annotations

import os

import tensorflow as tf

from data.errors import InputError

EXIT_STATUS = 5
DEFAULT_SECONDS = 600
# An elastic Horovod job keeps Gloo's own timeout: there a collective that gives up does
# not end the job, the workers re-form without the one that did not answer.
ELASTIC_SECONDS = 30


def checked(timeout_seconds) -> float:
    if (
        isinstance(timeout_seconds, bool)
        or not isinstance(timeout_seconds, (int, float))
        or not timeout_seconds > 0
    ):
        raise InputError(
            f"distribute.timeout_seconds must be a number of seconds > 0, got {timeout_seconds!r}."
        )
    return float(timeout_seconds)


def horovod_environment(timeout_seconds: float) -> dict[str, str]:
    """Horovod's variables for the timeout, set before `hvd.init()` reads them: Gloo's
    own timeout, and the stall check (a warning, then shutdown), Horovod's documented
    way to end a wait on NCCL. The stall shutdown did not fire on Gloo here: a worker
    whose main thread hung while its Horovod thread lived was still waited on after
    100 s at a 20 s timeout; the heartbeat's watchdog ends that job instead
    (trainer/backends/heartbeat.py)."""
    seconds = max(1, round(timeout_seconds))
    return {
        "HOROVOD_GLOO_TIMEOUT_SECONDS": str(seconds),
        "HOROVOD_STALL_CHECK_TIME_SECONDS": str(min(60, seconds)),
        "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": str(seconds),
    }


def set_horovod_environment(timeout_seconds: float) -> None:
    os.environ.update(horovod_environment(timeout_seconds))


def multi_worker_strategy(timeout_seconds: float) -> tf.distribute.MultiWorkerMirroredStrategy:
    """MultiWorkerMirroredStrategy whose collectives, peer health check and coordination
    service all wait `timeout_seconds` for a silent worker.

    TensorFlow has three clocks here, and only the first is public: the collectives'
    timeout; the coordination service, which declares a task dead after 10 s without
    its heartbeat; and the strategy's health check, which aborts every collective after
    three failed 10 s pings of a peer. Either of the last two ends a job on a 45 s
    pause, so both are set here before the strategy is built (it configures the
    coordination service only if none is, and its check's thread reads the class
    attribute).
    """
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.distribute import collective_all_reduce_strategy as collective
    from tensorflow.python.distribute import multi_worker_util
    from tensorflow.python.eager import context

    cluster = tf.distribute.cluster_resolver.TFConfigClusterResolver().cluster_spec()
    context.context().configure_coordination_service(
        service_type="standalone",
        service_leader=multi_worker_util.coordination_leader(cluster),
        coordinated_jobs=[
            coordination_config_pb2.CoordinatedJob(name=job, num_tasks=cluster.num_tasks(job))
            for job in ("chief", "worker")
            if job in cluster.jobs
        ],
        # A task is declared dead that long after its last heartbeat, which can precede
        # a pause by half of it: twice the timeout, so that any shorter pause survives
        # (the collectives' own timeout still ends the wait on a stopped worker).
        heartbeat_timeout_in_ms=round(2 * timeout_seconds * 1000),
    )
    extended = collective.CollectiveAllReduceExtended
    pings = extended._check_health_retry_limit
    extended._check_health_timeout = max(1, round(timeout_seconds / pings))
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout_seconds)
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


# What each backend says when a collective gave up (or was aborted because another
# worker's did): Gloo's timeout and closed connections, Horovod's shutdown after a stall
# or a failed worker, TensorFlow's collective timeout and peer health check.
_SIGNS = (
    "Timed out waiting",
    "Connection closed by peer",
    "Connection reset by peer",
    "Horovod has been shut down",
    "stalled for longer than",
    "cluster check alive failed",
    "stopped sending heartbeats",
    "Collective ops is aborted",
    "Deadline Exceeded",
)


def collective_failed(error: BaseException) -> bool:
    """Whether `error` (or one it was raised from) is a collective that waited past
    the timeout, or one aborted because of it."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, tf.errors.DeadlineExceededError):
            return True
        if isinstance(error, (tf.errors.OpError, RuntimeError)) and any(
            sign in str(error) for sign in _SIGNS
        ):
            return True
        error = error.__cause__ or error.__context__
    return False


def message(
    unanswering: list[str], step: int | None, timeout_seconds: float, last: str | None
) -> str:
    """The job's last line after a collective timed out."""
    who = "; ".join(unanswering) if unanswering else "no other worker has a heartbeat"
    at = f" at step {step}" if step else ""
    rerun = (
        f"the last complete checkpoint is {last}: the same command resumes from there"
        if last
        else "no checkpoint was complete yet: the same command starts again"
    )
    return (
        f"a collective waited more than distribute.timeout_seconds={timeout_seconds:g}{at}; "
        f"not answering: {who}. {rerun} (raise distribute.timeout_seconds if a step, "
        "an evaluation or a checkpoint legitimately takes longer)."
    )
