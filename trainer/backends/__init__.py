"""How the replicas work together: MirroredStrategy, Horovod and MultiWorkerMirrored
(replicas), placement on devices, the collective timeout and the heartbeats that name a
silent worker, elastic membership, and preemption."""
