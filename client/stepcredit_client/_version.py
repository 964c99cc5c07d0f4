__version__ = "0.4.0"
"""Also in client/pyproject.toml; the User-Agent sends it."""
