"""Adapter training: fit ReFT adapters on the served model with plain transformers and torch."""
