"""The ML of the VAS pipeline, importable without Dagster.

Concerns, lowest first; a module imports only its own concern, the ones before it, and the shared
modules at this level (artifacts, environment, profiles, progress, stages), which import no concern
(tests/test_layers.py):

    lm -> rewards -> data -> value -> decoding -> evaluation -> serving
"""
