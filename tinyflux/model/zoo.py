"""The spec's path of tinyflux.frozen.zoo, which `import tinyflux.model.zoo` and
`from tinyflux.model.zoo import ...` get itself."""

import sys

import tinyflux.frozen.zoo as _home

if __name__ == "__main__":  # python -m tinyflux.model.zoo make-tiny DIR, as documented before the move
    raise SystemExit(_home.main())
else:
    sys.modules[__name__] = _home
