"""The spec's path of tinyflux.cache.loaders, which `import tinyflux.trainer.data` and
`from tinyflux.trainer.data import ...` get itself."""

import sys

import tinyflux.cache.loaders as _home

sys.modules[__name__] = _home
