"""The cache: build inputs, encoding, the shard format and manifest, in-memory caches, aspect buckets and the loaders that read a cache for training (in memory or streamed)."""
