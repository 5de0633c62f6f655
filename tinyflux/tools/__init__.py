"""Tools for tests, benchmarks and the demo: the offline tiny zoo, the random full-size zoo and the built-in demo images. Training and sampling never import them."""
