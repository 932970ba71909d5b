"""The frozen base model: loading and pinning it (a tiny GPT-2 of its own, a Hugging Face folder, or a
GGUF file converted once), sampling from it with a KV cache, its log-probs, KV-cache row
operations, GGUF export, and the padding and schedule helpers every trainer shares.

May import: the shared modules of models/ only.
"""
