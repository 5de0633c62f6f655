"""The spec's path of tinyflux.sampling.sampler, which `import tinyflux.trainer.sampling` and
`from tinyflux.trainer.sampling import ...` get itself."""

import sys

import tinyflux.sampling.sampler as _home

sys.modules[__name__] = _home
