"""Parametric maps of the 4D sequences: diffusion (ADC, IVIM), perfusion (Tofts, curve features), habitats."""
