"""Put on PYTHONPATH by tests: the class centres of checkpoint STALLED_CENTRES_STEP are
never written (the writer thread sleeps for good), as on a hung file system; the job's
main thread goes on."""

import os
import sys
import time

from trainer.step import class_centres

STEP = int(os.environ["STALLED_CENTRES_STEP"])
_write_part = class_centres.ShardedCentres.write_part


def write_part(self, directory, step, entries):
    if step == STEP:
        print(f"stalling the centres of checkpoint {step}", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    return _write_part(self, directory, step, entries)


class_centres.ShardedCentres.write_part = write_part
