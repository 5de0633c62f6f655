"""Cache building, training (Trainer, checkpoints, engines, EMA, losses, schedules) and sampling."""
