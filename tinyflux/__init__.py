"""TinyFlux: compact Flux-style text-to-image transformers distilled from the Lune and Sol experts."""
