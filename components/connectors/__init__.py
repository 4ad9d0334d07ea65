"""Connectors (projectors) from encoder width to decoder width: importing this registers linear and mlp."""

from components.connectors import linear, mlp  # noqa: F401
