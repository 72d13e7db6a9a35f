"""Training: the loop, optimizer and freezing, data pipeline, checkpoints, metrics."""
