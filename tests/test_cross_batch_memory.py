"""CrossBatchMemory: a ring buffer of past embeddings as keys, against a loop reference."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import losses
from tests import reference

PAIR_CASES = [
    (
        lambda: losses.ContrastiveLoss(pos_margin=0.1, neg_margin=1.5),
        reference.contrastive,
        {"pos_margin": 0.1, "neg_margin": 1.5},
    ),
    (lambda: losses.MultiSimilarityLoss(epsilon=0.1), reference.multi_similarity, {"epsilon": 0.1}),
    (lambda: losses.SupConLoss(temperature=0.2), reference.supcon, {"temperature": 0.2}),
    (lambda: losses.NTXentLoss(), reference.ntxent, {}),
]


def batches(count=5, size=6, dim=4, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield (
            rng.integers(0, classes, size).astype(np.int64),
            rng.normal(size=(size, dim)).astype(np.float32),
        )


class RingReference:
    """The memory as a Python list of slots, written from the definition."""

    def __init__(self, size):
        self.size, self.slots, self.next = size, [None] * size, 0

    def enqueue(self, labels, x):
        positions = []
        for label, row in zip(labels, x, strict=True):
            self.slots[self.next] = (int(label), np.array(row, np.float64))
            positions.append(self.next)
            self.next = (self.next + 1) % self.size
        filled = [s for s in self.slots if s is not None]
        keys_x = np.array([s[1] for s in filled])
        keys_labels = [s[0] for s in filled]
        return keys_x, keys_labels, positions


@pytest.mark.parametrize("make,ref,kw", PAIR_CASES)
def test_pair_losses_with_memory_match_the_loop_reference(make, ref, kw):
    memory = losses.CrossBatchMemory(make(), memory_size=14)  # wraps around after 3 batches
    ring = RingReference(14)
    for step, (labels, x) in enumerate(batches()):
        got = float(memory(labels, x))
        keys = ring.enqueue(labels, x)
        want = ref(labels, x, keys=keys, **kw)
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5), step


@pytest.mark.parametrize(
    "make",
    [
        lambda: losses.TripletSemiHardLoss(margin=0.5),
        lambda: losses.TripletHardLoss(margin=0.5),
        lambda: losses.TripletBatchAllLoss(margin=0.5),
    ],
)
def test_triplet_losses_mine_the_memory_as_keys(make):
    loss = make()
    memory = losses.CrossBatchMemory(make(), memory_size=14)
    ring = RingReference(14)
    for labels, x in batches():
        got = float(memory(labels, x))
        keys_x, keys_labels, positions = ring.enqueue(labels, x)
        terms = loss.terms(x, labels, positions, keys_x.astype(np.float32), keys_labels)
        assert got == pytest.approx(float(losses.normalized(terms)), rel=1e-6)


@pytest.mark.parametrize("make,ref,kw", PAIR_CASES)
def test_gradient_flows_to_the_batch_only_and_matches_finite_differences(make, ref, kw):
    memory = losses.CrossBatchMemory(make(), memory_size=20)
    data = list(batches(count=3))
    for labels, x in data[:2]:
        memory(labels, x)
    ring = RingReference(20)
    for labels, x in data[:2]:
        ring.enqueue(labels, x)
    labels, x = data[2]
    keys = ring.enqueue(labels, x)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        value = memory(labels, xt)
    grad = tape.gradient(value, xt).numpy()
    # Keys are constants: the batch's own copies in the memory are not differentiated.
    numeric = reference.numeric_gradient(lambda z: ref(labels, z, keys=keys, **kw), x, eps=1e-5)
    np.testing.assert_allclose(grad, numeric, rtol=2e-3, atol=2e-3 * max(np.abs(numeric).max(), 1))
    assert np.abs(numeric).max() > 1e-3


def test_fit_trains_with_memory_in_a_compiled_step():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(8), 4)
    x = rng.normal(size=(32, 8)).astype(np.float32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8)])
    memory = losses.CrossBatchMemory(losses.SupConLoss(temperature=0.2), memory_size=64)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss=memory)
    before = float(losses.supcon_loss(labels, model(x), temperature=0.2))
    history = model.fit(x, labels, batch_size=8, epochs=6, shuffle=True, verbose=0)
    after = float(losses.supcon_loss(labels, model(x), temperature=0.2))
    assert np.all(np.isfinite(history.history["loss"]))
    assert after < before
    assert int(memory._filled.numpy()) == 64  # 6 epochs of 32 examples, capped at 64


def test_round_trip_reset_and_bad_settings():
    memory = losses.CrossBatchMemory(losses.NTXentLoss(temperature=0.3), memory_size=32)
    restored = keras.losses.deserialize(keras.losses.serialize(memory))
    assert isinstance(restored.loss, losses.NTXentLoss) and restored.loss.temperature == 0.3
    assert restored.memory_size == 32
    labels, x = next(batches())
    first = float(memory(labels, x))
    memory(labels, x * 2)
    assert float(memory(labels, x)) != first  # the memory now holds the other batches
    memory.reset()
    assert float(memory(labels, x)) == pytest.approx(first, rel=1e-6)
    with pytest.raises(ValueError, match="memory_size must be an integer >= 1, got 0"):
        losses.CrossBatchMemory(losses.SupConLoss(), memory_size=0)
    with pytest.raises(TypeError, match="query/key form.*TripletLoss"):
        losses.CrossBatchMemory(losses.TripletLoss(), memory_size=8)
    with pytest.raises(ValueError, match="width 4, got 3"):
        memory(labels, x[:, :3])
    with pytest.raises(
        (ValueError, tf.errors.InvalidArgumentError), match="larger than memory_size=4"
    ):
        losses.CrossBatchMemory(losses.SupConLoss(), memory_size=4)(labels, x)
