"""Global-batch mining across replicas equals one device on the concatenated batch."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import losses
from tests.cross_replica_case import (
    LOSSES,
    PAIR_LOSSES,
    build_model,
    global_batch,
    mirrored,
    replicated_step,
    row_modes,
    single_device_step,
)
from trainer.backends.replicas import MirroredReplicas, make_replicas, slice_bounds
from trainer.step.global_loss import loss_and_gradients

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5


def assert_same_step(single, replicated):
    (loss_1, grads_1), (loss_n, grads_n) = single, replicated[:2]
    assert loss_n == pytest.approx(loss_1, rel=TOLERANCE)
    assert len(grads_1) == len(grads_n)
    # Relative to the norm of the whole gradient: some variables' gradients are ~0 by
    # symmetry (the last bias: Euclidean distances ignore a common shift), only noise.
    scale = np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in grads_1))
    assert scale > 0
    for g1, gn in zip(grads_1, grads_n, strict=True):
        assert np.linalg.norm(np.asarray(gn, np.float64) - g1) <= TOLERANCE * scale


LOSS_ROWS = [
    pytest.param(name, known, id=f"{name}-{'rows_known' if known else 'rows_exchanged'}")
    for name in LOSSES
    for known in row_modes(name)
]


@pytest.mark.parametrize("replicas_count", [1, 2, 4])
@pytest.mark.parametrize("loss_name,known_rows", LOSS_ROWS)
def test_mirrored_equals_single_device(loss_name, replicas_count, known_rows):
    x, labels = global_batch()
    weights = build_model(x.shape[1]).get_weights()
    single = single_device_step(LOSSES[loss_name](), weights, x, labels)
    replicated = replicated_step(
        mirrored(replicas_count), LOSSES[loss_name](), weights, x, labels, known_rows=known_rows
    )
    assert_same_step(single, replicated)


@pytest.mark.parametrize("known_rows", [True, False], ids=["rows_known", "rows_exchanged"])
@pytest.mark.parametrize("loss_name", ["semihard", "hard", "batch_all_all"])
def test_unequal_replica_batches_are_exact(loss_name, known_rows):
    """A short last batch: 26 rows over 4 replicas are 7, 7, 6, 6 rows."""
    x, labels = global_batch(size=26)
    assert [e - s for s, e in slice_bounds(26, 4)] == [7, 7, 6, 6]
    weights = build_model(x.shape[1]).get_weights()
    single = single_device_step(LOSSES[loss_name](), weights, x, labels)
    replicated = replicated_step(
        mirrored(4), LOSSES[loss_name](), weights, x, labels, known_rows=known_rows
    )
    assert_same_step(single, replicated)


def test_any_int32_label_survives_the_gather():
    """Labels travel as two 16-bit halves in float columns: large and negative ones too."""
    x, labels = global_batch()
    values = np.array([2**31 - 1, -(2**31), -7, 70_000, 65_535, 0])
    labels = values[labels].astype(np.int64)
    weights = build_model(x.shape[1]).get_weights()
    single = single_device_step(LOSSES["semihard"](), weights, x, labels)
    replicated = replicated_step(
        mirrored(4), LOSSES["semihard"](), weights, x, labels, known_rows=True
    )
    assert_same_step(single, replicated)


def hard_negatives_on_the_other_replica():
    """Two replicas; each anchor's closest negatives live on the other replica."""
    near = [[0.0, 0.0], [0.1, 0.0], [5.0, 0.0], [5.1, 0.0]]
    x = np.array(near + [[p[0], p[1] + 0.2] for p in near], np.float32)
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3], np.int64)
    return x, labels


def test_global_mining_sees_negatives_of_other_replicas():
    x, labels = hard_negatives_on_the_other_replica()
    replicas = mirrored(2)
    loss = losses.TripletHardLoss(margin=0.5)

    def run(cross):
        @tf.function
        def step(local_x, local_labels):
            result = loss_and_gradients(
                loss, replicas, tf.identity, [], local_x, local_labels, cross
            )
            s = result.stats
            return result.loss, s["remote_negatives"] / s["chosen_negatives"]

        value, remote = replicas.run(step, replicas.split(x, labels))
        return float(replicas.local_results(value)[0]), float(replicas.local_results(remote)[0])

    global_loss, global_remote = run(True)
    local_loss, local_remote = run(False)
    assert global_loss == pytest.approx(float(losses.triplet_hard_loss(labels, x, 0.5)), rel=1e-6)
    assert local_loss == 0.0  # within one replica every negative is 5 away
    assert global_loss > 0.2
    assert global_remote == 1.0 and local_remote == 0.0


def _op_types(concrete) -> set:
    graph = concrete.graph.as_graph_def()
    nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
    return {n.op for n in nodes}


@pytest.mark.parametrize("rows_known", [True, False])
def test_logical_cpus_gather_by_adding_on_one_device_not_by_collective_ops(rows_known):
    """MirroredStrategy() on CPUs picks collective ops; the gather (both ways) and the
    sums of the step add on the first device instead (see replicas._host_summer), and
    stay exact. The same strategy seen as multi-worker keeps the strategy's collectives."""
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:3]
    strategy = tf.distribute.MirroredStrategy(devices)  # TensorFlow's own choice of ops
    rows = (1, 2, 3)

    def traced(replicas):
        @tf.function
        def step():
            def fn():
                me = replicas.replica_index()
                x = tf.fill([me + 1, 2], tf.cast(me + 1, tf.float32))
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    keys = replicas.all_gather(x, rows if rows_known else None)
                    target = tf.reduce_sum(keys * tf.range(6, dtype=tf.float32)[:, None])
                total = replicas.all_reduce_sum(tf.reduce_sum(x))
                return keys, tape.gradient(target, x), total

            return replicas.run(fn)

        return step

    host = MirroredReplicas(strategy, "mirrored")
    step = traced(host)
    keys, grads, totals = (host.local_results(v) for v in step())
    for r in range(3):
        np.testing.assert_array_equal(keys[r][:, 0], [1, 2, 2, 3, 3, 3])
        # d target / d key i = i on every replica; summed over 3 replicas: 3 i
        start = sum(rows[:r])
        np.testing.assert_array_equal(grads[r][:, 0], 3.0 * np.arange(start, start + rows[r]))
        assert float(totals[r]) == 2 * (1 + 4 + 9)
    assert not {op for op in _op_types(step.get_concrete_function()) if "Collective" in op}
    strategy_ops = traced(MirroredReplicas(strategy, "multi_worker")).get_concrete_function()
    assert {op for op in _op_types(strategy_ops) if "Collective" in op}


# Two workers run every loss; three (a ring of another size) the triplet ones.
WORKER_LOSSES = {2: list(LOSSES), 3: [name for name in LOSSES if name not in PAIR_LOSSES]}


@pytest.mark.parametrize("workers", [2, 3])
def test_horovod_workers_equal_single_device(workers, tmp_path):
    out = tmp_path / "result.npz"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    command = [
        str(Path(sys.executable).parent / "horovodrun"),
        "-np",
        str(workers),
        "--gloo",
        "-H",
        f"localhost:{workers}",
        sys.executable,
        "-m",
        "tests.horovod_worker",
        str(out),
        ",".join(WORKER_LOSSES[workers]),
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = np.load(out)
    assert int(result["size"]) == workers
    x, labels = global_batch()
    weights = build_model(x.shape[1]).get_weights()
    for name in WORKER_LOSSES[workers]:
        loss_1, grads_1 = single_device_step(LOSSES[name](), weights, x, labels)
        for known in row_modes(name):
            key = f"{name}/{'known' if known else 'exchanged'}"
            grads_n = [result[f"{key}/grad{i}"] for i in range(len(grads_1))]
            assert_same_step((loss_1, grads_1), (float(result[f"{key}/loss"]), grads_n))


def test_unknown_strategy_and_missing_tf_config_are_named(monkeypatch):
    with pytest.raises(ValueError, match="distribute.strategy 'mirored'.*'mirrored'"):
        make_replicas("mirored")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="TF_CONFIG"):
        make_replicas("multi_worker")
