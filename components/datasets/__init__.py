"""Datasets: importing this package registers every built-in dataset (one module each)."""

from components.datasets import llava, mixture, scenes, synthetic_shapes  # noqa: F401
