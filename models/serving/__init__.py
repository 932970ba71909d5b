"""Serving: the engine behind `vas serve` (no HTTP here), its continuous-batching scheduler, batched
reward scoring of finished requests, and the OpenAI protocol's request and response shapes.

May import: every other concern.
"""
