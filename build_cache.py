"""Encode a dataset once into a TinyFlux feature cache: VAE latents, T5 / CLIP embeddings, Lune / Sol teacher features.

    python build_cache.py --images DIR --output CACHE_DIR --resolution 512
    accelerate launch build_cache.py --dataset user/name --image_column image --caption_column text --output CACHE_DIR
    python build_cache.py --images DIR --output CACHE_DIR --zoo TINY_ZOO --model_preset tiny --resolution 64

Every process builds its own shards; a re-run finishes an interrupted build. Format and flags: docs/CACHE_FORMAT.md.
"""

from __future__ import annotations

import logging
import sys

from transformers import HfArgumentParser

from tinyflux.cache.build import BuildCacheArgs, run_build
from tinyflux.errors import TinyFluxError, message
from tinyflux.frozen.zoo import ZooError


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        (args,) = HfArgumentParser(BuildCacheArgs).parse_args_into_dataclasses(argv)
        run_build(args)
    except (TinyFluxError, ZooError) as e:  # ZooError: tinyflux.model's, not yet under TinyFluxError
        print(f"build_cache.py: error: {message(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
