"""Simulated hospitals, Flower simulation runs and benchmarks (protocols run in process through the drivers of
``common/`` with :class:`common.protocol.InMemoryQuery`)."""
