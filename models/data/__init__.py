"""Data: the embedded synthetic corpus, human-rated snippets and their continuations, preference
pairs (synthesized or imported), the base model's rollouts, the check that its samples spread
(probe), and validation (Great Expectations suites, quarantine of bad rows).

May import: lm, rewards.
"""
