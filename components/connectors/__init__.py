"""Connectors (projectors) from encoder width to decoder width: importing this registers linear, mlp and
c_abstractor."""

from components.connectors import c_abstractor, linear, mlp  # noqa: F401
