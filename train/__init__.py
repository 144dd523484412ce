"""The training loop and everything around it: config, state, step, checkpoints, metrics, CLI."""
