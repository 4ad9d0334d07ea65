"""Sequential reference scans for the SSM tests: one recurrence step per token, in fp32 (fp64 for fp64 inputs).

``selective_scan_ref`` takes ``components.mixers.selective_scan.selective_scan``'s arguments, ``ssd_ref`` those of
``components.mixers.ssd.ssd_chunked``; both follow mamba_ssm's ``selective_scan_ref`` / ``ssd_minimal`` tests
(github.com/state-spaces/mamba). Kept out of production code: only tests import them
(``from tests.components.ssm_reference import ...``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: Tensor | None = None,
    return_last_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Sequential reference for ``selective_scan`` (same arguments, no ``block``): one step per token, computed in
    fp32 (or fp64 for fp64 inputs)."""
    dtype = u.dtype
    f = torch.promote_types(dtype, torch.float32)
    u, delta, A, B, C = u.to(f), delta.to(f), A.to(f), B.to(f), C.to(f)
    if delta_bias is not None:
        delta = delta + delta_bias.to(f)
    if delta_softplus:
        delta = F.softplus(delta)
    h = initial_state.to(f) if initial_state is not None else u.new_zeros(u.shape[0], u.shape[2], A.shape[1])
    ys = []
    for u_t, d_t, b_t, c_t in zip(u.unbind(1), delta.unbind(1), B.unbind(1), C.unbind(1)):
        h = torch.exp(d_t.unsqueeze(-1) * A) * h + (d_t * u_t).unsqueeze(-1) * b_t.unsqueeze(1)
        ys.append(torch.einsum("bdn,bn->bd", h, c_t))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + u * D.to(f)
    if z is not None:
        y = y * F.silu(z.to(f))
    y = y.to(dtype)
    return (y, h) if return_last_state else y


def ssd_ref(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Sequential reference for ``ssd_chunked`` (same arguments): one recurrence step per token, computed in
    fp32 (or fp64 for fp64 inputs)."""
    dtype = x.dtype
    f = torch.promote_types(dtype, torch.float32)
    batch, length, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2:]
    x, dt, A = x.to(f), dt.to(f), A.to(f)
    if dt_bias is not None:
        dt = dt + dt_bias.to(f)
    if dt_softplus:
        dt = F.softplus(dt)
    B = B.to(f).repeat_interleave(nheads // ngroups, dim=2)  # [B, L, H, N]
    C = C.to(f).repeat_interleave(nheads // ngroups, dim=2)
    h = x.new_zeros(batch, nheads, headdim, dstate) if initial_state is None else initial_state.to(f)
    ys = []
    for x_t, dt_t, b_t, c_t in zip(x.unbind(1), dt.unbind(1), B.unbind(1), C.unbind(1)):
        dA = torch.exp(dt_t * A)[..., None, None]  # [B, H, 1, 1]
        h = dA * h + (x_t * dt_t.unsqueeze(-1)).unsqueeze(-1) * b_t.unsqueeze(-2)
        ys.append(torch.einsum("bhpn,bhn->bhp", h, c_t))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + x * D.to(f).view(nheads, -1)
    y = y.to(dtype)
    return (y, h) if return_final_state else y
