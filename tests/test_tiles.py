"""A mined loss in anchor tiles (losses/tiles.py) equals the whole block: every field of
its terms, and its gradients with respect to the anchors and the keys."""

import numpy as np
import pytest
import tensorflow as tf

from losses.tiles import ARRAYS_ALIVE, tile_rows, tiled_terms
from tests.cross_replica_case import LOSSES, global_batch


def terms_and_gradients(loss, rows, anchors, labels, keys, key_labels, calls):
    positions = tf.range(5, 5 + len(labels))  # the anchors are keys 5..5+n

    def counted(*args):
        calls.append(1)
        return loss.terms(*args)

    anchors, keys = tf.constant(anchors), tf.constant(keys)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([anchors, keys])
        terms = tiled_terms(counted, anchors, labels, positions, keys, key_labels, rows)
        parts = terms.part_sums if terms.part_sums is not None else terms.loss_sum
        target = tf.reduce_sum(parts * tf.cast(tf.range(1, 1 + tf.size(parts)), tf.float32))
    return terms, tape.gradient(target, [anchors, keys])


@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_tiles_of_3_anchors_equal_the_whole_block(loss_name):
    keys, key_labels = global_batch(size=30, seed=1)
    anchors, labels = keys[5:18], key_labels[5:18]  # 13 anchors: tiles of 3, 3, 3, 3, 1
    whole_calls, tiled_calls = [], []
    loss = LOSSES[loss_name]()
    whole, whole_grads = terms_and_gradients(
        loss, None, anchors, labels, keys, key_labels, whole_calls
    )
    tiled, tiled_grads = terms_and_gradients(
        loss, 3, anchors, labels, keys, key_labels, tiled_calls
    )
    assert len(whole_calls) == 1 and len(tiled_calls) == 5 * 2  # forward, then recomputed
    for name, a, b in zip(whole._fields, whole, tiled, strict=True):
        if a is None:
            assert b is None, name
        else:
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=name)
    for a, b in zip(whole_grads, tiled_grads, strict=True):
        assert np.abs(a).max() > 0
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_the_tile_fits_the_budget():
    assert tile_rows(65_536, 256 * 2**20) == 256 * 2**20 // (65_536 * 4 * ARRAYS_ALIVE) == 64
    assert tile_rows(10**9, 1) == 1  # at least one row
    assert tile_rows(None, 2**20) is None  # keys unknown when traced: one block
