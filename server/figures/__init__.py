"""Figures the server draws from aggregates: one module per phase that plots."""
