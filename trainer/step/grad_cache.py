"""Cached-gradient chunking (GradCache, Gao et al. 2021) of a replica's embedding pass.

The loss of a mined batch couples every embedding, so the batch cannot be split into
micro-batches whose gradients add up. Its *embeddings* can be: the loss's gradient
with respect to them is small (rows × D), and back-propagating that "cache" chunk by
chunk gives exactly the whole batch's weight gradient. So a replica

1. embeds its slice chunk by chunk with no tape, keeping no activations;
2. mines and differentiates the loss with respect to the embeddings (the caller's
   tape watches them, and everything else it differentiates, as without chunking);
3. embeds each chunk again under a tape and accumulates
   `tape.gradient(chunk, variables, output_gradients=cache[chunk])`.

Peak activation memory is one chunk's, for one extra forward pass. The chunks run one
after another (a while loop with no parallel iterations), so the number of rows a
replica holds can be any, even unknown when the step is traced.

Randomness: both passes must draw the same dropout masks and augmentations, or the
cached gradient is applied to activations that never produced it. Every Keras
`SeedGenerator` of the model is set back before the second pass, which then visits
the chunks in the same order and draws the same seeds; it ends where the first pass
left them. Layer state the forward pass updates (BatchNorm's moving statistics) is
put back after the second pass too, so each chunk updates it once, as a ghost batch.
"""

from __future__ import annotations

import tensorflow as tf

from data.errors import InputError


def check_chunk_size(value, setting: str = "train.embedding_chunk_size") -> int | None:
    """None, or a positive int; otherwise an error naming the setting."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InputError(
            f"{setting} must be a positive int (the rows a replica embeds at a time) or None "
            f"(the whole slice at once), got {value!r}."
        )
    return value


class EmbeddingPass:
    """The whole slice embedded under the caller's tape: the step without chunking."""

    def embeddings(self, forward, tape, inputs) -> tf.Tensor:
        del tape  # recorded by it already
        return tf.cast(forward(inputs), tf.float32)

    def gradient(self, tape, target, variables, others=()) -> list:
        """[d target / d v for v in variables, then for each of `others`]."""
        return tape.gradient(target, [*variables, *others])


class ChunkedEmbeddingPass(EmbeddingPass):
    """The slice embedded `chunk_size` rows at a time, twice (see the module's docstring).

    One instance serves one step's trace: `embeddings` keeps the inputs and the cached
    embeddings that `gradient` then back-propagates.
    """

    def __init__(self, model, chunk_size: int):
        self.chunk_size = check_chunk_size(chunk_size)
        self.model = model
        self._pending = None

    def _seed_states(self) -> list:
        layers = self.model._flatten_layers(include_self=True)
        return [generator.state for layer in layers for generator in layer._seed_generators]

    def _state_variables(self) -> list:
        """Non-trainable state a training-mode forward pass may change (BatchNorm's)."""
        seeds = {id(v) for v in self._seed_states()}
        return [v for v in self.model.non_trainable_variables if id(v) not in seeds]

    def _chunks(self, inputs):
        inputs = tf.nest.map_structure(tf.convert_to_tensor, inputs)
        rows = tf.shape(tf.nest.flatten(inputs)[0])[0]
        count = (rows + self.chunk_size - 1) // self.chunk_size

        def chunk(i):
            start = i * self.chunk_size
            size = tf.minimum(self.chunk_size, rows - start)
            return start, size, tf.nest.map_structure(lambda t: t[start : start + size], inputs)

        return count, chunk

    def embeddings(self, forward, tape, inputs) -> tf.Tensor:
        self._seeds_before = [tf.identity(s.value) for s in self._seed_states()]
        count, chunk = self._chunks(inputs)
        with tape.stop_recording():

            def body(i, outputs):
                _, _, rows = chunk(i)
                return i + 1, outputs.write(i, tf.cast(forward(rows), tf.float32))

            # The first chunk outside the loop: its output gives the embeddings' static
            # width, which the loop's outputs would lose.
            first = tf.cast(forward(chunk(0)[2]), tf.float32)
            empty = tf.TensorArray(
                tf.float32,
                size=tf.maximum(count, 1),
                infer_shape=False,
                element_shape=tf.TensorShape([None]).concatenate(first.shape[1:]),
            )
            _, outputs = tf.while_loop(
                lambda i, _: i < count, body, (1, empty.write(0, first)), parallel_iterations=1
            )
            embeddings = tf.stop_gradient(outputs.concat())
            # As many rows as the inputs, known when traced if theirs is (the mining's
            # anchor tiles need it).
            embeddings.set_shape([tf.nest.flatten(inputs)[0].shape[0], *first.shape[1:]])
        tape.watch(embeddings)
        self._pending = (forward, inputs, embeddings)
        return embeddings

    def gradient(self, tape, target, variables, others=()) -> list:
        forward, inputs, embeddings = self._pending
        cache, *other_grads = tape.gradient(target, [embeddings, *others])
        if cache is None:  # the loss does not depend on the embeddings
            return [None] * len(variables) + other_grads
        return [*self._backpropagate(forward, inputs, cache, variables), *other_grads]

    def _backpropagate(self, forward, inputs, cache, variables) -> list:
        """Σ over chunks of the chunk's vector-Jacobian product with its cached gradient."""
        state = self._state_variables()
        after_first_pass = [tf.identity(v.value) for v in state]
        for seed, value in zip(self._seed_states(), self._seeds_before, strict=True):
            seed.assign(value)
        count, chunk = self._chunks(inputs)
        connected = set()  # which variables the model's output depends on (at trace time)

        def body(i, *totals):
            start, size, rows = chunk(i)
            with tf.GradientTape() as tape:
                outputs = tf.cast(forward(rows), tf.float32)
            grads = tape.gradient(outputs, variables, output_gradients=cache[start : start + size])
            connected.update(k for k, g in enumerate(grads) if g is not None)
            summed = [
                total if g is None else total + tf.convert_to_tensor(g)
                for total, g in zip(totals, grads, strict=True)
            ]
            return (i + 1, *summed)

        zeros = [tf.zeros(v.shape, v.dtype) for v in variables]
        _, *totals = tf.while_loop(
            lambda i, *_: i < count, body, (0, *zeros), parallel_iterations=1
        )
        with tf.control_dependencies(totals):
            for variable, value in zip(state, after_first_pass, strict=True):
                variable.assign(value)
            totals = [tf.identity(t) for t in totals]
        # A variable the output does not depend on keeps a None gradient, as unchunked:
        # the optimizer must leave it (and its moments) alone.
        return [t if k in connected else None for k, t in enumerate(totals)]


def embedding_pass(model, chunk_size: int | None) -> EmbeddingPass:
    """The pass a step embeds with: whole, or chunked when `chunk_size` is set."""
    if chunk_size is None:
        return EmbeddingPass()
    return ChunkedEmbeddingPass(model, chunk_size)
