"""Simulated hospitals, in-process protocol runners, Flower simulation runs and benchmarks."""
