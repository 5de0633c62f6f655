"""Sampling: prompts to images with the student alone (conditioning, the Euler sampler with CFG, grids)."""
