"""Fixtures for small feature caches (owned by the cache tests)."""
