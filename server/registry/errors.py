"""Typed errors of the model registry; each names the registry, the record or file at fault, and the fix."""

from __future__ import annotations

from common.errors import FedBiopsyError


class RegistryError(FedBiopsyError):
    """The registry cannot do what was asked (bad location, bad artifact entry, unreadable artifact)."""


class UnknownVersionError(RegistryError):
    """No model version matches the reference given."""


class SchemaError(RegistryError):
    """The registry database has a schema this fedbiopsy cannot use (newer, foreign or damaged)."""


class ArtifactError(RegistryError):
    """An artifact's bytes are missing, truncated or changed."""
