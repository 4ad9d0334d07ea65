"""Decoders: the pattern-driven hybrid stack (Transformer, Mamba, Mamba-2, MoE, any mix)."""

from components.decoders import hybrid  # noqa: F401
