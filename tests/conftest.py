import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# MirroredStrategy tests need logical CPU devices, which must exist before TensorFlow
# initializes; split the CPU into 4 once for the whole session (N = 1, 2, 4 use a prefix).
from trainer.backends.replicas import configure_cpu_replicas  # noqa: E402

CPU_REPLICAS = 4
configure_cpu_replicas(CPU_REPLICAS)
