"""Prompt templates: importing this package registers vicuna_v1, llama3, chatml, jamba and hf."""

from components.templates import chatml, hf, jamba, llama3, vicuna_v1  # noqa: F401
