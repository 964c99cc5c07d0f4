"""HTTP layer: app factory, routes, error mapping, metrics, auth."""

from .app import create_app

__all__ = ["create_app"]
