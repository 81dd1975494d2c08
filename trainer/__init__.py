"""The training job: entry point, replica backends, model, loop, evaluation, export."""
