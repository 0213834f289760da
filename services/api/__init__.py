"""The HTTP API (FastAPI): ``create_app`` builds it; ``modelbus up`` serves it with uvicorn."""

from modelbus.services.api.app import create_app

__all__ = ["create_app"]
