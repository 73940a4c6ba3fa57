"""Inference-time tools for looped models: zero-shot early-exit criteria."""
