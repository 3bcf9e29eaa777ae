"""ganet.train: training GA-ShuffleNet checkpoints."""
