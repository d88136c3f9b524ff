"""burrow's version, in a module of its own so that reading it imports nothing else."""

# pyproject.toml says the same (tests/test_client_imports.py checks).
__version__ = "0.1.0"
