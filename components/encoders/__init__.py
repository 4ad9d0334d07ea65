"""Vision encoders: importing this package registers every built-in encoder."""

from components.encoders import timm_vit  # noqa: F401
