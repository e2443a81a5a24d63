"""Tests of the OpenAI-compatible server (a package, so its conftest never shadows tests/conftest.py)."""
