"""Rewards: the gold rewards (a lexicon for positivity, length for conciseness) that the evaluation
scores with, the learned Bradley-Terry reward models trained from preference pairs, and
ensembles of them.

May import: lm.
"""
