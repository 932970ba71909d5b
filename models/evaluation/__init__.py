"""Evaluation: base sampling, Best-of-N, VAS, ARGS and DPO side by side, the exact tilt, the value
error against Monte-Carlo estimates, the seed study and its targets, and the report.

May import: lm, rewards, data, value, decoding.
"""
