"""TinyFlux: compact Flux-style text-to-image transformers distilled from two teachers, Lune and Sol."""
