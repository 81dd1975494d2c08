"""Run under horovodrun -np 2: precise BatchNorm over the same global batches as
tests/test_batchnorm.py, each worker holding half of each; rank 0 writes the moving
statistics of every layer to OUT.npz."""

import sys

import numpy as np

from tests.test_batchnorm import batches, bn_model
from trainer.backends.replicas import make_replicas
from trainer.model import batchnorm_layers
from trainer.step.batchnorm import BatchNormStatistics

replicas = make_replicas("horovod")
model = bn_model()
start, end = replicas.process_rows(16)
mine = ((images[start:end], labels[start:end], ok[start:end]) for images, labels, ok in batches())
done = BatchNormStatistics(model, replicas)(mine, global_size=16, assign=True)
if replicas.rank == 0:
    values = {}
    for i, layer in enumerate(batchnorm_layers(model)):
        values[f"mean{i}"] = layer.moving_mean.numpy()
        values[f"variance{i}"] = layer.moving_variance.numpy()
    np.savez(sys.argv[1], batches=done["batches"], cosine=done["train_mean_cosine"], **values)
