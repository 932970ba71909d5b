"""Value models of the frozen base policy: their parameterizations (scalar V(s·a), per-token and
distributional Q heads), TD(lambda) targets, training (single process, checkpointed, or
distributed), heads distilled from a teacher, and where trained models are stored.

May import: lm, rewards, data.
"""
