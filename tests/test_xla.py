"""train.jit_compile_model / GlobalMiningModel(jit_compile_model=True): the model's
forward and backward passes compiled by XLA (which runs on the CPU too), the mining
outside; the same losses and weights as the uncompiled step."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import losses
from tests.cross_replica_case import build_model, global_batch, mirrored
from trainer.fit import GlobalMiningModel
from trainer.loop import train
from trainer.replicas import Replicas
from trainer.train_step import TrainStep, model_forward


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
    common = dict(steps=3, log_every=1, eval_every=1000, export_model=False)
    plain = train(str(tmp_path / "plain"), Replicas(), **common)
    compiled = train(str(tmp_path / "xla"), Replicas(), jit_compile_model=True, **common)
    from tests.jobs import scalars

    want, got = scalars(tmp_path / "plain", "train/loss"), scalars(tmp_path / "xla", "train/loss")
    assert sorted(got) == [1, 2, 3]
    for step in want:
        np.testing.assert_allclose(got[step], want[step], rtol=1e-5)
    assert compiled == pytest.approx(plain, abs=1e-6)  # the final evaluation


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
