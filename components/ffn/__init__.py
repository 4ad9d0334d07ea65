"""Feed-forward blocks: SwiGLU MLP and top-k mixture of experts."""

from components.ffn import mlp, moe  # noqa: F401
