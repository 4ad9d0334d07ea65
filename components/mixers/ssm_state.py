"""The constant-size decoding state shared by the SSM mixers (Mamba-1 ``MambaState``, Mamba-2 ``Mamba2State``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SSMState:
    """Constant-size decoding state of one SSM mixer, updated in place by the mixer's forward.

    ``conv_state`` holds the last ``d_conv`` inputs of the causal convolution (oldest first); ``ssm_state``
    the recurrent state; ``seqlen_offset`` how many tokens have gone through it. ``pad`` ([B] integers, or None)
    says that row b starts with ``pad[b]`` positions of left padding (batched generation of prompts of
    different lengths): the mixer zeroes their conv inputs and time steps, so the state stays exactly zero
    through them and the row computes what it would alone (``valid_positions``).
    """

    conv_state: Tensor
    ssm_state: Tensor
    seqlen_offset: int = 0
    pad: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.conv_state.shape[0]

    def reset(self) -> None:
        """Zero the state in place (reuse the buffers for a new sequence)."""
        self.conv_state.zero_()
        self.ssm_state.zero_()
        self.seqlen_offset = 0
        self.pad = None


def valid_positions(state: SSMState | None, length: int) -> Tensor | None:
    """[B, length] bool, False at the left padding among the next ``length`` positions of ``state``'s rows;
    None when the state has no padding (or none is left: a decoding step is always a real token)."""
    if state is None or state.pad is None or length == 1:
        return None
    positions = torch.arange(state.seqlen_offset, state.seqlen_offset + length, device=state.pad.device)
    return positions[None, :] >= state.pad[:, None]


def keep_last_state(result: Tensor | tuple[Tensor, Tensor], state: SSMState | None) -> Tensor:
    """The output of a scan called with ``return_last_state=state is not None``.

    Without ``state`` the scan returned y alone; with it, ``(y, last)``: ``last`` is stored into
    ``state.ssm_state`` (in place, in the state's dtype) and y is returned.
    """
    if state is None:
        return result
    y, last = result
    state.ssm_state.copy_(last)
    return y
