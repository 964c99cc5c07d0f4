__version__ = "0.3.0"
"""Also in client/pyproject.toml; the User-Agent sends it."""
