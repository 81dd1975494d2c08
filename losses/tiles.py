"""A mined loss computed in tiles of anchor rows, in its forward and its backward pass.

Every query/key loss (the `*_terms` functions) is a sum over its anchors: each anchor's
terms depend on that anchor and on all the keys, never on another anchor. So the anchors
can be split into tiles whose terms are added up, exactly as the anchors of several
replicas are. What this buys is memory: a loss's (anchors × keys) distance and mask
arrays then exist for one tile at a time. At a global batch of 65,536 on 8 devices a
replica's block is 8,192 × 65,536 floats (2 GB); in tiles of 512 rows it is 128 MB.

The backward pass must not keep every tile's arrays either, so each tile's loss is a
custom gradient that keeps only its inputs and recomputes the tile under a tape when
the gradient is asked for (the "recompute" of gradient checkpointing). Tiles run one
after another in both passes (each waits on the one before), so at most one tile's
arrays are alive at once.
"""

from __future__ import annotations

import tensorflow as tf

from losses.triplet import TripletTerms

# How many (anchors × keys) float32 arrays a loss keeps alive at once, at most: the
# distances, the label masks, the mined candidates and their gradient in the recompute.
ARRAYS_ALIVE = 8


def tile_rows(keys: int | None, budget_bytes: int) -> int | None:
    """Anchor rows per tile for `keys` keys within `budget_bytes` (at least 1 row);
    None (one whole block) when the key count is not known when traced."""
    if keys is None:
        return None
    return max(1, budget_bytes // (max(keys, 1) * 4 * ARRAYS_ALIVE))


def tiled_terms(terms_fn, anchors, anchor_labels, anchor_positions, keys, key_labels, rows):
    """`terms_fn(anchors, ...)` (a query/key loss) summed over tiles of `rows` anchors.

    The anchor count must be known when traced (it fixes the number of tiles); with an
    unknown count, `rows` None, or a single tile, this is `terms_fn` itself.
    """
    count = anchors.shape[0] if anchors.shape[0] is not None else anchor_labels.shape[0]
    if rows is None or count is None or count <= rows:
        return terms_fn(anchors, anchor_labels, anchor_positions, keys, key_labels)
    keys = tf.convert_to_tensor(keys)
    tiles, backward = [], []  # backward: the last tile gradient built, to wait for
    for start in range(0, count, rows):
        end = min(start + rows, count)
        # Each tile waits for the one before, its keys too: a loss's work on the keys
        # alone (normalizing them) would otherwise run for every tile at once, at the
        # start, and hold a copy of the keys per tile.
        with tf.control_dependencies([tiles[-1].loss_sum] if tiles else []):
            tile_anchors, tile_keys = tf.identity(anchors[start:end]), tf.identity(keys)
        tiles.append(
            _recomputed_tile(
                terms_fn,
                tile_anchors,
                anchor_labels[start:end],
                anchor_positions[start:end],
                tile_keys,
                key_labels,
                backward,
            )
        )
    return _summed(tiles)


def _recomputed_tile(
    terms_fn, anchors, anchor_labels, anchor_positions, keys, key_labels, backward: list
):
    """One tile's terms; its gradient recomputes the tile rather than keeping its arrays.

    Only loss_sum and part_sums carry a gradient (the rest are counts and monitoring
    values); a custom gradient's outputs must all be tensors, so a loss without parts
    passes zeros in their place. Nothing orders the tiles' gradients but `backward`:
    each waits for the one built before it, or the executor would run them all at once
    and hold every tile's arrays together.
    """
    has_parts = []

    def terms_of(anchors, keys):
        return terms_fn(anchors, anchor_labels, anchor_positions, keys, key_labels)

    @tf.custom_gradient
    def tile(anchors, keys):
        terms = terms_of(anchors, keys)
        has_parts.append(terms.part_sums is not None)
        values = [tf.convert_to_tensor(v) for v in terms[:-2]]
        parts = terms[-2:] if has_parts[0] else (tf.zeros([1]), tf.zeros([1]))

        def gradient(d_loss_sum, *upstream):
            d_part_sums = upstream[-2]
            with tf.control_dependencies(backward[-1:]):
                with tf.GradientTape() as tape:
                    tape.watch([anchors, keys])
                    again = terms_of(tf.identity(anchors), tf.identity(keys))
                    target = again.loss_sum * d_loss_sum
                    if again.part_sums is not None:
                        target += tf.reduce_sum(again.part_sums * d_part_sums)
                d_anchors, d_keys = tape.gradient(target, [anchors, keys])
                d_anchors = tf.zeros_like(anchors) if d_anchors is None else d_anchors
                d_keys = tf.zeros_like(keys) if d_keys is None else tf.convert_to_tensor(d_keys)
            backward[:] = [d_keys]
            return d_anchors, d_keys

        return [*values, *parts], gradient

    values = tile(anchors, keys)
    if not has_parts[0]:
        values = [*values[:-2], None, None]
    return TripletTerms(*values)


def _summed(tiles: list) -> TripletTerms:
    """The anchors' terms from their tiles': sums of the scalars and parts, the
    per-term vectors end to end."""
    first = tiles[0]
    scalar = lambda name: tf.add_n([getattr(t, name) for t in tiles])  # noqa: E731
    vector = lambda name: tf.concat([getattr(t, name) for t in tiles], axis=0)  # noqa: E731
    return TripletTerms(
        loss_sum=scalar("loss_sum"),
        count=scalar("count"),
        num_active=scalar("num_active"),
        num_terms=scalar("num_terms"),
        negative_index=vector("negative_index"),
        positive_distances=vector("positive_distances"),
        negative_distances=vector("negative_distances"),
        part_sums=None if first.part_sums is None else scalar("part_sums"),
        part_counts=None if first.part_counts is None else scalar("part_counts"),
    )
