"""Fixtures for the offline tiny zoo (owned by the zoo tests)."""
