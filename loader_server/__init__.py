"""npyloader server: index .npy datasets, read and augment them in worker processes, serve batches."""
