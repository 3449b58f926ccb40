"""The base of every study-config section: frozen, and unknown keys rejected so that a typo never passes."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
