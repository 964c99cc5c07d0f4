__version__ = "0.3.1"
"""Also in client/pyproject.toml; the User-Agent sends it."""
