"""Small built-in datasets (tinyflux.data.demo: procedurally drawn shapes with captions)."""
