"""Decoding with values: VAS itself (pi0 tilted by exp(beta·Q) over the top-k), reward-guided
decoding (ARGS), black-box VAS over an upstream OpenAI-compatible server, `vas generate`, and the
transformers LogitsProcessor.

May import: lm, rewards, data, value.
"""
