"""A mined loss computed in tiles of anchor rows, in its forward and its backward pass.

Every query/key loss (the `*_terms` functions) is a sum over its anchors: each anchor's
terms depend on that anchor and on all the keys, never on another anchor. So the anchors
can be split into tiles whose terms are added up, exactly as the anchors of several
replicas are. What this buys is memory: a loss's (anchors × keys) distance and mask
arrays then exist for one tile at a time. At a global batch of 65,536 on 8 devices a
replica's block is 8,192 × 65,536 floats (2 GB); in tiles of 512 rows it is 128 MB.

The tiles are the iterations of a loop (`tf.while_loop`, one iteration at a time), not
an unrolled Python loop: the graph, and what TensorFlow spends on tracing, optimizing
and running it, stays the size of one tile whatever their number (unrolled, each tile
cost about 18 MB at 8,192 keys, more than its arrays). The backward pass must not keep
every tile's arrays either, so the whole tiled loss is one custom gradient that keeps
only its inputs and recomputes each tile under a tape in a second loop (the "recompute"
of gradient checkpointing), adding each tile's key gradient to one running sum.
"""

from __future__ import annotations

import tensorflow as tf

from losses.triplet import TripletTerms

# How many (anchors × keys) float32 arrays a loss keeps alive at once, at most: the
# distances, the label masks, the mined candidates and their gradient in the recompute.
# Measured (semi-hard, the most, at 8,192 keys): each MiB of tile array added 15 MiB to
# the step's peak; the pair losses and SupCon less.
ARRAYS_ALIVE = 16

# Fields summed over tiles (scalars, and the parts' fixed-size vectors); the others are
# per-term vectors, put end to end.
_SUMMED = ("loss_sum", "count", "num_active", "num_terms", "part_sums", "part_counts")


def tile_rows(keys: int | None, budget_bytes: int) -> int | None:
    """Anchor rows per tile for `keys` keys within `budget_bytes` (at least 1 row);
    None (one whole block) when the key count is not known when traced."""
    if keys is None:
        return None
    return max(1, budget_bytes // (max(keys, 1) * 4 * ARRAYS_ALIVE))


def tiled_terms(terms_fn, anchors, anchor_labels, anchor_positions, keys, key_labels, rows):
    """`terms_fn(anchors, ...)` (a query/key loss) summed over tiles of `rows` anchors.

    The anchor count must be known when traced (it fixes the number of tiles); with an
    unknown count, `rows` None, or a single tile, this is `terms_fn` itself. Only
    `loss_sum` and `part_sums` carry a gradient (the rest are counts and monitoring
    values), as for the trainer's use of the whole block.
    """
    count = anchors.shape[0] if anchors.shape[0] is not None else anchor_labels.shape[0]
    if rows is None or count is None or count <= rows:
        return terms_fn(anchors, anchor_labels, anchor_positions, keys, key_labels)
    tiles = -(-count // rows)

    def rows_of(i, tensor):
        return tensor[i * rows : (i + 1) * rows]

    def tile(i, tile_anchors, keys):
        """Tile i's terms: `tile_anchors` are its rows of the anchors."""
        return terms_fn(
            tile_anchors,
            rows_of(i, anchor_labels),
            rows_of(i, anchor_positions),
            keys,
            key_labels,
        )

    structure = []  # the first tile's fields: which are None

    @tf.custom_gradient
    def tiled(anchors, keys):
        first = tile(0, rows_of(0, anchors), keys)
        structure.extend(name for name, value in first._asdict().items() if value is None)
        summed = {k: v for k, v in first._asdict().items() if k in _SUMMED and v is not None}
        vectors = {
            k: _rows_array(v.dtype, tiles, v.shape).write(0, v)
            for k, v in first._asdict().items()
            if k not in _SUMMED and v is not None
        }

        def body(i, summed, vectors):
            terms = tile(i, rows_of(i, anchors), keys)._asdict()
            summed = {k: total + terms[k] for k, total in summed.items()}
            vectors = {k: array.write(i, terms[k]) for k, array in vectors.items()}
            return i + 1, summed, vectors

        _, summed, vectors = tf.while_loop(
            lambda i, *_: i < tiles, body, (1, summed, vectors), parallel_iterations=1
        )
        values = {**summed, **{k: array.concat() for k, array in vectors.items()}}
        names = [k for k in TripletTerms._fields if k in values]
        flat = [values[k] for k in names]

        def gradient(*upstream):
            d = dict(zip(names, upstream, strict=True))
            d_loss_sum = 0.0 if d["loss_sum"] is None else d["loss_sum"]
            d_part_sums = d.get("part_sums")

            def body(i, d_keys, d_anchors):
                tile_anchors = rows_of(i, anchors)
                with tf.GradientTape() as tape:
                    tape.watch([tile_anchors, keys])
                    again = tile(i, tile_anchors, keys)
                    target = again.loss_sum * d_loss_sum
                    if d_part_sums is not None:
                        target += tf.reduce_sum(again.part_sums * d_part_sums)
                d_tile, d_tile_keys = tape.gradient(
                    target, [tile_anchors, keys], unconnected_gradients="zero"
                )
                d_anchors = d_anchors.write(i, tf.convert_to_tensor(d_tile))
                return i + 1, d_keys + tf.convert_to_tensor(d_tile_keys), d_anchors

            d_anchor_tiles = _rows_array(anchors.dtype, tiles, anchors.shape)
            _, d_keys, d_anchor_tiles = tf.while_loop(
                lambda i, *_: i < tiles,
                body,
                (0, tf.zeros_like(keys), d_anchor_tiles),
                parallel_iterations=1,
            )
            return d_anchor_tiles.concat(), d_keys

        return flat, gradient

    values = iter(tiled(tf.convert_to_tensor(anchors), tf.convert_to_tensor(keys)))
    return TripletTerms(*(None if k in structure else next(values) for k in TripletTerms._fields))


def _rows_array(dtype, size: int, shape: tf.TensorShape) -> tf.TensorArray:
    """A TensorArray of `size` tiles of rows, concatenated with the static rank and
    inner dimensions of `shape` (the mining indexes the result by rank)."""
    element = tf.TensorShape([None]).concatenate(shape[1:])
    return tf.TensorArray(dtype, size=size, infer_shape=False, element_shape=element)
