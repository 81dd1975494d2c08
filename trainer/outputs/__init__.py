"""What a job leaves on disk (job_outputs): checkpoints, TensorBoard summaries, the
SavedModel export, and a plain error when the disk is full."""
