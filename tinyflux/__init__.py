"""TinyFlux: compact Flux-style text-to-image transformers distilled from the Lune and Sol experts."""

from tinyflux.util import optional

optional.install()  # before anything imports diffusers or peft: bitsandbytes loads only when chosen
