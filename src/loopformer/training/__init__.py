"""Training: data pipeline, optimiser, checkpoints, metrics and the trainer."""
