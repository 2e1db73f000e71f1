"""Training: the loop, losses, validation, distributed helpers and the run log."""
