"""Sequence mixers: attention, Mamba (v1), Mamba-2. Each registers itself with its pattern letter.

The SSM operations the Mamba mixers share live in their own modules: ``causal_conv`` (depthwise causal conv),
``selective_scan`` (Mamba-1 scan), ``ssd`` (Mamba-2 chunked SSD), ``kernels`` (lazy probing of the optional CUDA
kernels and the per-call choice of path) and ``ssm_state`` (the decoding state).
"""

from components.mixers import attention, mamba, mamba2  # noqa: F401
