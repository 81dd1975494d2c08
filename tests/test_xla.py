"""train.jit_compile_model / GlobalMiningModel(jit_compile_model=True): the model's
forward and backward passes compiled by XLA (which runs on the CPU too), the mining
outside; the same losses and weights as the uncompiled step."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import losses
from tests.cross_replica_case import build_model, global_batch, mirrored
from trainer.backends.replicas import Replicas
from trainer.fit import GlobalMiningModel
from trainer.loop import train
from trainer.step.train_step import TrainStep, model_forward


def run_steps(replicas, jit, steps=3):
    x, labels = global_batch(size=24, classes=6)
    with replicas.scope():
        model = build_model(x.shape[1])
        optimizer = keras.optimizers.SGD(0.5)
    step = TrainStep(
        model, optimizer, losses.TripletSemiHardLoss(margin=0.5), replicas, jit_compile_model=jit
    )
    values = []
    for s in range(steps):
        values.append(step(x + 0.1 * s, labels)["loss"])
    return np.array(values), [v.numpy() for v in model.trainable_variables], step


@pytest.mark.parametrize("backend", ["single", "mirrored2"])
def test_a_compiled_model_trains_exactly_as_the_uncompiled_one(backend):
    replicas = Replicas() if backend == "single" else mirrored(2)
    plain_loss, plain_weights, _ = run_steps(replicas, jit=False)
    xla_loss, xla_weights, step = run_steps(replicas, jit=True)
    np.testing.assert_allclose(xla_loss, plain_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(xla_weights, plain_weights, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert plain_loss[0] != plain_loss[-1]  # it trained


def test_the_forward_and_backward_passes_are_marked_for_xla():
    model = build_model()
    forward = model_forward(model, jit_compile=True)
    x = tf.zeros([4, 6])

    @tf.function
    def differentiate():
        with tf.GradientTape() as tape:
            value = tf.reduce_sum(forward(x))
        return tape.gradient(value, model.trainable_variables)

    graph = differentiate.get_concrete_function().graph
    calls = [op for op in graph.get_operations() if op.type.endswith("PartitionedCall")]
    assert len(calls) == 2  # the forward function and its gradient
    assert all(op.get_attr("_XlaMustCompile") for op in calls)
    assert not hasattr(
        model_forward(model), "experimental_get_compiler_ir"
    )  # plain: no tf.function


def test_the_job_with_jit_compile_model_equals_the_job_without(tmp_path):
    """XLA must preserve the training: the loss curve, every checkpointed variable and the
    evaluation embeddings at rtol=1e-5. MAP@R and recall@k are step functions of the
    ranking, so they are compared within what the measured embedding differences can
    reorder (`reordering_bound`), not at a fixed tolerance."""
    from data.sources import digits
    from tests.jobs import gin_bound, scalars

    # SGD: a weight's change is its gradient times the rate. Adam divides by the root of
    # the gradient's second moment, which turns the rounding of a near-zero gradient into
    # a change of up to the rate itself (seen: 2.8e-6 at rate 1e-4), whatever XLA does.
    common = dict(steps=3, log_every=1, eval_every=1000)
    runs = {"plain": {}, "xla": {"jit_compile_model": True}}
    with gin_bound({"optimizer.name": "sgd", "optimizer.learning_rate": 0.05}):
        results = {name: train(str(tmp_path / name), Replicas(), **common, **extra)
                   for name, extra in runs.items()}  # fmt: skip
    want, got = scalars(tmp_path / "plain", "train/loss"), scalars(tmp_path / "xla", "train/loss")
    assert sorted(got) == [1, 2, 3]
    for step in want:
        np.testing.assert_allclose(got[step], want[step], rtol=1e-5)

    plain_variables, xla_variables = (_checkpointed(tmp_path / name) for name in runs)
    assert sorted(xla_variables) == sorted(plain_variables) and len(plain_variables) >= 4
    for name, value in plain_variables.items():
        np.testing.assert_allclose(xla_variables[name], value, rtol=1e-5, atol=1e-7, err_msg=name)

    held_out = digits(classes=(6, 10))
    plain, compiled = (_served(tmp_path / name, held_out.items) for name in runs)
    np.testing.assert_allclose(compiled, plain, rtol=1e-5, atol=1e-6)
    for key, bound in reordering_bound(plain, compiled, held_out.labels).items():
        difference = abs(results["xla"][key] - results["plain"][key])
        assert difference <= bound + 1e-12, (key, difference, bound)


def _checkpointed(workdir) -> dict:
    """Every float variable of the job's last checkpoint (model and optimizer)."""
    path = tf.train.latest_checkpoint(str(workdir / "checkpoints"))
    reader = tf.train.load_checkpoint(path)
    dtypes = reader.get_variable_to_dtype_map()
    return {name: reader.get_tensor(name) for name in dtypes if dtypes[name].is_floating}


def _served(workdir, images) -> np.ndarray:
    """The evaluation embeddings, through the job's own export (checked by the job
    against what it evaluated, to 1e-5)."""
    exported = tf.saved_model.load(str(workdir / "saved_model"))
    return exported.serve(tf.constant(images)).numpy()


def reordering_bound(a, b, labels, ks=(1, 4)) -> dict:
    """How far MAP@R and recall@k can move between the cosine rankings of embeddings `a`
    and `b` (N, D) of the same images, from the change in their distances alone.

    For query q, delta is the largest change of a distance from q between the runs, plus
    twice the rounding of the job's float32 distances (measured on both): two keys can
    trade places in the job's rankings only if their exact distances differ by at most
    2 delta.
    - AP@R_q reads the first R_q ranks, and both runs' first R_q lie within T, the keys
      at most t + 2 delta from q (t: the R_q-th smallest distance in `a`).
    - Swapping adjacent keys of the same relevance changes nothing. Swapping a relevant
      key at rank i with an irrelevant one at i + 1 turns its term c/i into c/(i + 1)
      (c <= i), or at the cut i = R_q drops it: at most 1/R_q of AP.
    - Reordering T takes one such swap per (relevant, irrelevant) pair of T that changes
      order, so AP_q moves by at most s_q / R_q, with s_q the (relevant, irrelevant)
      pairs of T within 2 delta; MAP@R (mean over queries with R_q > 0) by their mean.
    - A query's recall@k can change only if such a pair lies within t_k + 2 delta.
    With no near ties the bound is 0, and the figures must agree exactly.
    """
    labels = np.asarray(labels)

    def cosine_distances(x):
        unit = np.asarray(x, np.float64) / np.linalg.norm(x, axis=1, keepdims=True)
        return 1.0 - unit @ unit.T

    def float32_rounding(x, exact):  # per query
        x = tf.constant(x, tf.float32)
        return np.max(np.abs(losses.pairwise_distances(x, x, "cosine").numpy() - exact), axis=1)

    def near_pairs(relevant, irrelevant, delta, limit):
        """(relevant, irrelevant) pairs within 2 delta, both at most `limit` from q."""
        relevant, irrelevant = relevant[relevant <= limit], irrelevant[irrelevant <= limit]
        above = np.searchsorted(irrelevant, relevant + 2 * delta, side="right")
        return int((above - np.searchsorted(irrelevant, relevant - 2 * delta)).sum())

    da, db = cosine_distances(a), cosine_distances(b)
    rounding = np.maximum(float32_rounding(a, da), float32_rounding(b, db))
    n = len(labels)
    ap_moves, with_relevant = 0.0, 0
    recall_moves = dict.fromkeys(ks, 0)
    for q in range(n):
        others = np.arange(n) != q
        delta = np.max(np.abs(da[q] - db[q])[others]) + 2 * rounding[q]
        same = labels == labels[q]
        relevant, irrelevant = np.sort(da[q][same & others]), np.sort(da[q][~same])
        ranked = np.sort(da[q][others])
        if len(relevant):
            with_relevant += 1
            limit = ranked[len(relevant) - 1] + 2 * delta
            ap_moves += near_pairs(relevant, irrelevant, delta, limit) / len(relevant)
        for k in ks:
            limit = ranked[k - 1] + 2 * delta
            recall_moves[k] += near_pairs(relevant, irrelevant, delta, limit) > 0
    return {"map@r": ap_moves / with_relevant, **{f"recall@{k}": recall_moves[k] / n for k in ks}}


def test_global_mining_model_fit_with_a_compiled_model_equals_without():
    x, labels = global_batch(size=48, classes=6)
    histories, weights = [], []
    for jit in (False, True):
        model = GlobalMiningModel(build_model(x.shape[1]), jit_compile_model=jit)
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss=losses.TripletHardLoss())
        history = model.fit(x, labels, batch_size=24, epochs=2, shuffle=False, verbose=0)
        histories.append(history.history["loss"])
        weights.append(model.get_weights())
        assert model.get_config()["jit_compile_model"] is jit
    np.testing.assert_allclose(histories[1], histories[0], rtol=1e-5)
    for got, want in zip(weights[1], weights[0], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
