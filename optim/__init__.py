"""Optax chains: AdamW and LAMB, learning-rate schedules, clipping, weight-decay masks, gradient accumulation."""
