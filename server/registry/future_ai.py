"""The 30 FUTURE-AI recommendations (BMJ 2025;388:e081554), paraphrased as in docs/FUTURE_AI.md.

``scope`` says what the system can ever evidence by itself: ``automatic``, ``partial`` (the rest is
organisational) or ``organisational``. A model card marks each item with a :data:`STATUSES` value, never "done".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Scope = Literal["automatic", "partial", "organisational"]
STATUSES: tuple[str, ...] = ("evidenced", "partly evidenced", "not evidenced", "organisational")


@dataclass(frozen=True)
class Item:
    """One recommendation."""

    code: str
    principle: str
    title: str
    scope: Scope


ITEMS: tuple[Item, ...] = (
    Item("F1", "Fairness", "Define potential sources of bias early", "partial"),
    Item("F2", "Fairness", "Collect individual and data attributes", "automatic"),
    Item("F3", "Fairness", "Evaluate fairness (and debiasing)", "automatic"),
    Item("Un1", "Universality", "Define intended clinical settings and cross-setting variation", "partial"),
    Item("Un2", "Universality", "Use community-defined standards", "automatic"),
    Item("Un3", "Universality", "Evaluate on external data / multiple sites", "automatic"),
    Item("Un4", "Universality", "Evaluate and demonstrate local clinical validity", "partial"),
    Item("T1", "Traceability", "Risk-management process across the lifecycle", "organisational"),
    Item("T2", "Traceability", "Provide documentation", "automatic"),
    Item("T3", "Traceability", "Quality control of inputs and outputs", "automatic"),
    Item("T4", "Traceability", "Periodic auditing and updating", "partial"),
    Item("T5", "Traceability", "Logging system for usage", "automatic"),
    Item("T6", "Traceability", "Mechanisms for AI governance", "partial"),
    Item("Us1", "Usability", "Define intended use and user requirements", "organisational"),
    Item("Us2", "Usability", "Human-AI interaction and oversight", "partial"),
    Item("Us3", "Usability", "Training materials and activities", "organisational"),
    Item("Us4", "Usability", "Evaluate user experience and acceptance with independent users", "organisational"),
    Item("Us5", "Usability", "Evaluate clinical utility and safety", "organisational"),
    Item("R1", "Robustness", "Define sources of data variation early", "partial"),
    Item("R2", "Robustness", "Train with representative real-world data", "automatic"),
    Item("R3", "Robustness", "Evaluate and optimise robustness", "automatic"),
    Item("E1", "Explainability", "Define explainability need and requirements with users", "organisational"),
    Item("E2", "Explainability", "Evaluate explainability", "partial"),
    Item("G1", "General", "Engage interdisciplinary stakeholders", "organisational"),
    Item("G2", "General", "Data privacy and security", "partial"),
    Item("G3", "General", "Address identified AI risks", "partial"),
    Item("G4", "General", "Define an adequate evaluation plan", "automatic"),
    Item("G5", "General", "Identify and comply with regulations", "organisational"),
    Item("G6", "General", "Application-specific ethical issues", "organisational"),
    Item("G7", "General", "Social and societal issues", "organisational"),
)
