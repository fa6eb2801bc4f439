"""Shared core: config, model, HF io, tokenizer, sharding, weights, checkpoints, metrics."""
