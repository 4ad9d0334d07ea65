"""Sequence mixers: attention, Mamba (v1), Mamba-2. Each registers itself with its pattern letter."""

from components.mixers import attention, mamba, mamba2  # noqa: F401
