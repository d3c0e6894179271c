"""PruneGym environments and everything they wrap: models, sparsity plans, meters, tasks, rewards."""
