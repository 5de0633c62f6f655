"""Small shared helpers: dtypes, the experts' prediction container, plots, this API document."""
