"""Data sources, the class-balanced P×K sampler and tf.data pipelines."""
