"""b1k-train: data_loaders."""
