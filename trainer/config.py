"""Registers every gin configurable the job can name, so a config can use them.

The losses stay free of gin (losses/ imports TensorFlow and Keras only); they are
registered here by class name, as `@TripletSemiHardLoss()` etc. in configs.
"""

import gin

import data.pipeline  # noqa: F401  (images.*, pixels.*)
import data.sources  # noqa: F401  (digits, image_folder, tfrecord)
import trainer.backends.replicas  # noqa: F401  (distribute.*)
import trainer.evaluation  # noqa: F401  (evaluation.*)
import trainer.loop  # noqa: F401  (train.*)
import trainer.model  # noqa: F401  (digits_convnet, small_convnet, backbone_embedding)
import trainer.step.learner  # noqa: F401  (learning_rate_schedule.*)
from losses import LOSS_CLASSES

for _loss in LOSS_CLASSES:
    gin.external_configurable(_loss)
