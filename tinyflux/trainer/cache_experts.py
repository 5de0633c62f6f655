"""The spec's path of tinyflux.cache.memory, which `import tinyflux.trainer.cache_experts` and
`from tinyflux.trainer.cache_experts import ...` get itself."""

import sys

import tinyflux.cache.memory as _home

sys.modules[__name__] = _home
