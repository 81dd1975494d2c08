"""Embedding models: a small conv net for the embedded digits job."""

from __future__ import annotations

import keras


def digits_model(embedding_dim: int = 32, width: int = 32) -> keras.Model:
    """Conv net for 8×8 digits -> L2-normalized embedding (no BatchNorm: replica-exact)."""
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(width, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(2 * width, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(2 * width, 3, padding="same", activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(embedding_dim),
            keras.layers.UnitNormalization(),
        ],
        name="digits_embedding",
    )
