"""ganet.train: training GA-ShuffleNet checkpoints (issue 3 builds it)."""
