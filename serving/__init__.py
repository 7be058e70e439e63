"""b1k-train: serving."""
