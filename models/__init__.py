"""The ML of the VAS pipeline, importable without Dagster."""
