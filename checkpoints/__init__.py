"""b1k-train: checkpoints."""
