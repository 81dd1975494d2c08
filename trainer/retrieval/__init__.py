"""Search and verification over embeddings: exact and faiss neighbours, the index folder
that trainer.index writes, the threshold's calibration, and TAR@FAR."""
