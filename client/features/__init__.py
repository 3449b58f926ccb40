"""Imaging features computed at the site: radiomics (pyradiomics) and deep features; they never leave the site."""
