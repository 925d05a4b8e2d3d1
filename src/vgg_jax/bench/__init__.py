"""Measurement tools, outside the training core (the modules: docs/architecture.md)."""
