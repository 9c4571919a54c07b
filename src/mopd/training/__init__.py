"""Training: one step, the loop around it, evaluation during training, checkpoints."""
