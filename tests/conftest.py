"""Shared pytest fixtures live in per-area plugin modules so that each area owns its own."""

pytest_plugins = ["tests.fixtures_zoo", "tests.fixtures_cache"]
