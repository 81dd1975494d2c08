"""Put on PYTHONPATH by tests: SIGUSR1 makes this process's main thread hang for good,
while its other threads (Horovod's, TensorFlow's, the heartbeat) go on: a worker alive
but stuck, as in a write to a hung file system."""

import signal
import time


def hang_forever(signum, frame):
    while True:
        time.sleep(3600)


signal.signal(signal.SIGUSR1, hang_forever)
