"""Vision encoders: importing this package registers every built-in encoder (timm_vit, fused).

``anyres`` (AnyRes tiling) and ``preprocess`` (timm data config -> image transform) are helpers, not
components."""

from components.encoders import fused, timm_vit  # noqa: F401
