"""Data: local corpora, tokenizers, and deterministic, resumable, per-host sharded batch loaders."""
