"""TinyFlux: compact Flux-style text-to-image transformers distilled from two teachers, Lune and Sol."""

from tinyflux.util import optional

optional.install()  # before anything imports diffusers or peft: bitsandbytes loads only when chosen
