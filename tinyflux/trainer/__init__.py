"""Training: the config and its CLI, the Trainer and its step, checkpoints, engines, runtime, EMA, losses,
schedules, metrics, the optimizer, LoRA and Hub uploads. It reads caches through tinyflux.cache."""
