"""`train.cross_batch_memory` in the training job: replica-count invariant, reported in
TensorBoard, checkpointed (a restarted job resumes with the same memory), refused where
it cannot work. Each test runs `python -m trainer.main` as users do."""

import os

import numpy as np
import pytest

from tests.jobs import (
    HOROVOD_2,
    RESUMABLE_JOB,
    ROOT,
    SHORT_JOB,
    run_job,
    scalars,
    series,
    straight_and_resumed,
)

MEMORY = ("train.cross_batch_memory=96",)  # 1.5 global batches: it fills, then drops
BACKENDS = {
    "single": ((), ("distribute.strategy='single'",)),
    "mirrored2": ((), ("distribute.strategy='mirrored'", "distribute.cpu_replicas=2")),
    "horovod2": (HOROVOD_2, ("distribute.strategy='horovod'",)),
    "multi_worker2": ((os.path.join(ROOT, "launch", "multi_worker.sh"), "local", "2"), ()),
}


@pytest.fixture(scope="module")
def memory_runs(tmp_path_factory):
    """train/loss and train/memory_negative_fraction per step, on each backend, plus the
    same job without memory."""
    results = {}
    for name, (launcher, params) in BACKENDS.items():
        workdir = tmp_path_factory.mktemp(name)
        run_job(workdir, SHORT_JOB + params + MEMORY, launcher)
        results[name] = {
            "loss": series(workdir, "train/loss"),
            "memory": series(workdir, "train/memory_negative_fraction"),
        }
    workdir = tmp_path_factory.mktemp("no_memory")
    run_job(workdir, SHORT_JOB + BACKENDS["single"][1])
    results["no_memory"] = {"loss": series(workdir, "train/loss"), "workdir": workdir}
    return results


@pytest.mark.parametrize("backend", ["mirrored2", "horovod2", "multi_worker2"])
def test_memory_job_equals_single_device(memory_runs, backend):
    single, other = memory_runs["single"]["loss"], memory_runs[backend]["loss"]
    assert len(single) == len(other) == 6
    np.testing.assert_allclose(other, single, rtol=1e-4)
    # The share of chosen negatives is a count: after a few steps the backends' float
    # rounding may flip a near-tie or two among the thousands of choices.
    np.testing.assert_allclose(
        memory_runs[backend]["memory"], memory_runs["single"]["memory"], atol=2e-3
    )


def test_the_memory_supplies_negatives_and_changes_the_loss(memory_runs):
    with_memory, without = memory_runs["single"], memory_runs["no_memory"]
    # Step 1 has an empty memory: the same loss as without. Later steps mine it too.
    assert with_memory["memory"][0] == 0.0
    assert np.all(with_memory["memory"][1:] > 0.1), with_memory["memory"]
    assert with_memory["loss"][0] == pytest.approx(without["loss"][0], rel=1e-6)
    assert np.max(np.abs(with_memory["loss"][1:] - without["loss"][1:])) > 1e-3
    # Without memory the tag is not written at all.
    with pytest.raises(KeyError):
        scalars(without["workdir"], "train/memory_negative_fraction")


def test_restart_resumes_with_the_same_memory(tmp_path):
    params = RESUMABLE_JOB + (
        "train.global_batch_size=64",
        "train.loss=@MultiSimilarityLoss()",
        *MEMORY,
    )
    straight, stopped, _, resumed = straight_and_resumed(tmp_path, params)
    assert "at step 3" in resumed
    expected, got = scalars(straight, "train/loss"), scalars(stopped, "train/loss")
    for step in (4, 5, 6):
        np.testing.assert_allclose(got[step], expected[step], rtol=1e-5)
    # An empty memory after the restart would lose the memory's negatives at step 4.
    fraction = scalars(stopped, "train/memory_negative_fraction")
    assert fraction[4] == pytest.approx(scalars(straight, "train/memory_negative_fraction")[4])
    assert fraction[4] > 0


@pytest.mark.parametrize(
    "params, message",
    [
        (
            ("train.cross_batch_memory=-1",),
            "train.cross_batch_memory must be >= 0 (0: off), got -1",
        ),
        (
            ("train.cross_batch_memory=64", "train.cross_replica_mining=False"),
            "needs train.cross_replica_mining=True",
        ),
    ],
)
def test_memory_mistakes_exit_2_naming_the_binding(tmp_path, params, message):
    done = run_job(tmp_path, params, check=False)
    assert done.returncode == 2
    assert message in done.stderr
