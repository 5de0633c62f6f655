"""The student network (pure torch: config, layers, experts, math, the v4.2-compatible loader) and the frozen models
that feed the cache (the zoo: VAE, text encoders, the Lune and Sol teachers)."""
