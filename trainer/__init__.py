"""b1k-train: trainer."""
