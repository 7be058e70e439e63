"""b1k-train: models."""
