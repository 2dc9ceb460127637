"""Bundled model files (package data; see docs/model-card.md)."""
