"""Dagster assets and asset checks, one module per stage. Thin: the ML lives in models/."""
