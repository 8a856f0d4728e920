"""Model, config schema, losses, optimizer, schedules, checkpoints and the training loop."""
