"""Training: data pipeline, optimiser, metrics and the trainer (the checkpoint format: :mod:`loopformer.checkpoint`)."""
