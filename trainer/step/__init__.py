"""One training step: the learner (model, optimizer, precision), the global loss over
all-gathered embeddings, GradCache's chunked passes, the cross-batch memory, the sharded
class centres and synchronized BatchNorm."""
