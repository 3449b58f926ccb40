"""The study's ``maps`` section: which parametric maps each 4D sequence becomes, and how they are fitted."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from common.config_base import _Frozen
from common.maps.habitats import PREFIX as HABITAT_PREFIX
from common.maps.layout import DCE, DWI, FOUR_D, MAPS_OF, is_map, study_channels


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

    def check_sequences(self, sequences: tuple[str, ...], reference: str) -> None:
        """A study's sequences against this section: a 3D reference, maps for every 4D series, no name twice."""
        if reference in FOUR_D:
            raise ValueError(f"reference_sequence {reference!r} is a 4D series; name a 3D sequence")
        four_d = [s for s in sequences if s in FOUR_D]
        empty = [s for s in four_d if not self.of(s)]
        if empty:
            raise ValueError(f"sequence(s) {empty} are listed but maps.<sequence> names no map to use")
        if not four_d:
            return
        clash = [s for s in sequences if is_map(s)]
        if clash:
            raise ValueError(f"sequence(s) {clash} carry the name of a fitted map; rename the acquired series "
                             "(e.g. ADC_scanner) or drop it and let the site fit the map")
        channels = study_channels(sequences, {s: self.of(s) for s in FOUR_D})
        if len(set(channels)) != len(channels):
            raise ValueError(f"channels {list(channels)} repeat a name; list each sequence and map once")

    def of(self, sequence: str) -> tuple[str, ...]:
        """The maps a 4D sequence becomes."""
        return self.DWI if sequence == DWI else self.DCE if sequence == DCE else ()
