"""Site preprocessing: small composable steps recorded in a per-case history, and the pipeline that runs them.

One module per step: :mod:`.denoise` (NLM), :mod:`.bias` (N4), :mod:`.resample`, :mod:`.register` (rigid,
Mattes MI), :mod:`.normalise` (z-score, percentiles, Nyúl); :mod:`.pipeline` builds them from the study config
and the plan; :mod:`.cohort` runs them over a site in parallel.
"""

from client.preprocessing.base import STEP_TYPES, CaseVolumes, Step, steps_from_history
from client.preprocessing.bias import N4BiasCorrection
from client.preprocessing.denoise import NLMDenoise
from client.preprocessing.normalise import NyulStandardise, PercentileRescale, ZScoreNormalise
from client.preprocessing.pipeline import Pipeline, build_pipeline
from client.preprocessing.register import RigidRegister
from client.preprocessing.resample import Resample

__all__ = ["STEP_TYPES", "CaseVolumes", "N4BiasCorrection", "NLMDenoise", "NyulStandardise", "PercentileRescale",
           "Pipeline", "Resample", "RigidRegister", "Step", "ZScoreNormalise", "build_pipeline",
           "steps_from_history"]
