"""The study's ``maps`` section: which parametric maps each 4D sequence becomes, and how they are fitted."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from common.config_base import _Frozen
from common.maps.habitats import PREFIX as HABITAT_PREFIX
from common.maps.layout import DCE, DWI, MAPS_OF


class MapsConfig(_Frozen):
    """Maps of the 4D sequences (``DWI``, ``DCE``) that the study's later phases use as channels."""

    DWI: tuple[str, ...] = ("ADC",)  # noqa: N815 (the sequence's name: any of MAPS_OF["DWI"])
    DCE: tuple[str, ...] = ("Ktrans", "ve")  # noqa: N815 (any of MAPS_OF["DCE"])
    tofts: Literal["standard", "extended"] = "standard"
    align: bool = True  # register each series (b0 / DCE baseline) rigidly to the reference sequence
    foreground_fraction: float = Field(0.1, gt=0, lt=1)  # voxels fitted: b0 or baseline above this x its 99th pct
    habitats: tuple[str, str] | None = ("ADC", "Ktrans")  # two maps -> four habitat volume fractions; None: off
    habitat_thresholds: tuple[float, float] = (1.2e-3, 0.1)  # in the maps' units (ADC mm2/s, Ktrans 1/min)

    @staticmethod
    def unharmonised_columns(columns: list[str]) -> list[str]:
        """The feature columns ComBat leaves as they are: the habitat fractions. They come from fixed physical
        thresholds on maps, are compositional, and a habitat may be absent at a whole site (a constant ComBat
        cannot scale); they are copied into the harmonised table unchanged. Fixed here, not a study setting,
        so that a study cannot let other features skip ComBat."""
        return [c for c in columns if c.startswith(f"{HABITAT_PREFIX}_")]

    @model_validator(mode="after")
    def _known(self) -> MapsConfig:
        for seq, names in ((DWI, self.DWI), (DCE, self.DCE)):
            unknown = [n for n in names if n not in MAPS_OF[seq]]
            if unknown:
                raise ValueError(f"maps.{seq}: unknown map(s) {unknown}; choose from {list(MAPS_OF[seq])}")
        if self.habitats is not None:
            listed = set(self.DWI) | set(self.DCE)
            missing = [m for m in self.habitats if m not in listed]
            if missing:
                raise ValueError(f"maps.habitats names {missing}, not among the study's maps {sorted(listed)}")
        return self

    def of(self, sequence: str) -> tuple[str, ...]:
        """The maps a 4D sequence becomes."""
        return self.DWI if sequence == DWI else self.DCE if sequence == DCE else ()
