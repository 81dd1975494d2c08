"""A short demo of the losses on scikit-learn's digits (what `make train` runs for now).

Metric-learning protocol: train an embedding on digit classes 0-5 with the semi-hard
triplet loss through `model.compile` / `fit`, then measure retrieval (Recall@1, nearest
neighbour by cosine distance) on the held-out classes 6-9, against raw pixels.
This stands in for `python -m trainer.main` until the distributed trainer lands.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from losses import TripletSemiHardLoss, pairwise_distances  # noqa: E402


def retrieval(embeddings, labels) -> dict:
    """Recall@1 and MAP@R of every example queried against all others (cosine)."""
    d = pairwise_distances(embeddings, embeddings, "cosine").numpy()
    np.fill_diagonal(d, np.inf)
    ranked = labels[np.argsort(d, axis=1)] == labels[:, None]  # relevance by rank
    r = ranked.sum(axis=1)  # R: the other members of each query's class
    precision = np.cumsum(ranked, axis=1) / np.arange(1, len(labels) + 1)
    in_top_r = np.arange(len(labels))[None, :] < r[:, None]
    map_at_r = np.sum(precision * ranked * in_top_r, axis=1) / np.maximum(r, 1)
    return {"recall@1": float(ranked[:, 0].mean()), "map@r": float(map_at_r.mean())}


def main(epochs: int = 10, seed: int = 0) -> dict:
    start = time.time()
    keras.utils.set_random_seed(seed)
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    train, held_out = y < 6, y >= 6
    print(
        f"digits: {train.sum()} training images (classes 0-5), "
        f"{held_out.sum()} held-out images (classes 6-9)"
    )
    raw = retrieval(x[held_out].reshape(-1, 64), y[held_out])
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(32),
            keras.layers.UnitNormalization(),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=TripletSemiHardLoss(margin=0.2, distance="cosine"),
    )
    print(f"training {epochs} epochs with TripletSemiHardLoss(margin=0.2, distance='cosine') ...")
    history = model.fit(
        x[train], y[train].astype(np.int32), batch_size=128, epochs=epochs, shuffle=True, verbose=0
    )
    losses = history.history["loss"]
    for epoch in range(0, epochs, max(1, epochs // 6)):
        print(f"  epoch {epoch + 1:3d}/{epochs}  loss {losses[epoch]:.4f}")
    learned = retrieval(model.predict(x[held_out], verbose=0), y[held_out])
    for name in ("recall@1", "map@r"):
        print(
            f"held-out {name:<8}: raw pixels {raw[name]:.3f} -> learned embedding "
            f"{learned[name]:.3f}"
        )
    print(f"done in {time.time() - start:.0f} s")
    return {"raw": raw, "learned": learned, "final_loss": losses[-1]}


if __name__ == "__main__":
    main()
