"""Flower-free core of fedbiopsy: configuration, site data, validation and the maths of each protocol."""

__version__ = "0.1.0"
