"""Training: state, sharded step, loop, checkpoints, logging."""
