"""Mamba-2 mixer: the state space dual (SSD) layer of Dao & Gu, "Transformers are SSMs: Generalized Models and
Efficient Algorithms Through Structured State Space Duality" (arXiv 2405.21060); reference code
``mamba_ssm/modules/mamba2.py``.

Parameter names and shapes are exactly those of ``mamba_ssm.Mamba2`` (``in_proj``, ``conv1d``, ``dt_bias``,
``A_log``, ``D``, ``norm.weight``, ``out_proj``), so a state dict moves between this module and ``mamba_ssm``::

    x ─ in_proj ─┬─ z ─────────────────────────────────────────────────────┐
                 ├─ x, B, C ─ causal conv1d ─ SiLU ─ SSD scan (heads) ─ y ─ gated RMSNorm(y, z) ─ out_proj ─►
                 └─ dt (one per head) ────────────────┘

Paths (``use_kernels``; the kernels are probed lazily in ``kernels.py``):

- training/prefill without a state, on CUDA: upstream's fused ``mamba_split_conv1d_scan_combined`` (conv, SSD
  scan, gated RMSNorm and out_proj in one autograd function, recomputed in backward), when the layout allows
  it (``fused_layout``: in_proj width, conv channels and the xBC offset multiples of 8, as causal_conv1d's
  channel-last kernel needs them); else ``causal_conv1d_fn`` + ``mamba_chunk_scan_combined`` + the norm here.
- a prefill continuing a state: the conv in PyTorch from the cached inputs, ``mamba_chunk_scan_combined``.
- one token: ``causal_conv1d_update`` + ``selective_state_update``.
- otherwise (CPU, ``never``, sizes the kernels refuse): the pure-PyTorch chunked SSD in ``ssd.py``, same math,
  with a CPU-sized chunk (``SSD_CHUNK``).

Packed sequences: ``forward(x, seq_idx=...)`` ([B, L] integers, non-decreasing from 0, one per packed
sequence) keeps the conv and the state from crossing sequence boundaries, on every path (the kernels' own
``seq_idx``; it needs conv channels % 8 == 0 there, else ``auto`` runs the PyTorch path). Not supported:
``seq_idx`` with a decoding state, and ``cu_seqlens`` (upstream uses it only to return per-sequence states
for inference). The decoder does not pack sequences yet, so only direct callers pass ``seq_idx``.

Left padding (``state.pad``, batched generation): the padded positions' conv inputs and time steps are zeroed, so
the state stays exactly zero through them, on every path (the scan then receives softplus(dt + dt_bias) itself).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.mixers.causal_conv import causal_conv1d, causal_conv1d_seq, conv_step, last_inputs
from components.mixers.kernels import (
    FUSED_NORM_MAX_GROUP,
    check_use_kernels,
    conv_input,
    kernel_limits,
    log_path_once,
    mamba2_kernels,
    select_kernels,
)
from components.mixers.ssd import SSD_CHUNK, ssd_chunked
from components.mixers.ssm_state import SSMState, keep_last_state, valid_positions
from toolkit.registry import register


@dataclass
class Mamba2State(SSMState):
    """Decoding state of one Mamba-2 mixer.

    conv_state: [B, conv_dim, d_conv] (conv_dim = d_ssm + 2 * ngroups * d_state), the last ``d_conv`` conv
    inputs. ssm_state: [B, nheads, headdim, d_state].
    """


class RMSNormGated(nn.Module):
    """RMSNorm with a SiLU gate, per group of ``group_size`` channels (mamba_ssm ``layernorm_gated.RMSNorm``).

    ``norm_before_gate=False`` (Mamba-2's default): rmsnorm(x * silu(z)) * weight; True: rmsnorm(x) * weight * silu(z).
    """

    def __init__(
        self, dim: int, *, eps: float = 1e-5, group_size: int | None = None, norm_before_gate: bool = False
    ):
        super().__init__()
        self.eps, self.group_size, self.norm_before_gate = eps, group_size or dim, norm_before_gate
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        """x, z: [..., dim] -> [..., dim], computed in fp32."""
        dtype = x.dtype
        x = x.float()
        if z is not None and not self.norm_before_gate:
            x = x * F.silu(z.float())
        groups = x.unflatten(-1, (-1, self.group_size))
        x = (groups * torch.rsqrt(groups.square().mean(-1, keepdim=True) + self.eps)).flatten(-2)
        x = x * self.weight.float()
        if z is not None and self.norm_before_gate:
            x = x * F.silu(z.float())
        return x.to(dtype)


@register("mixer", "mamba2", symbol="M")
class Mamba2(nn.Module):
    """Mamba-2 SSD mixer (mamba_ssm names): multi-head SSM with scalar decay per head and a gated RMSNorm."""

    def __init__(
        self,
        d_model: int,
        *,
        layer_idx: int = 0,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        d_ssm: int | None = None,
        ngroups: int = 1,
        A_init_range: Sequence[float] = (1.0, 16.0),
        D_has_hdim: bool = False,
        rmsnorm: bool = True,
        norm_before_gate: bool = False,
        norm_eps: float = 1e-5,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        bias: bool = False,
        conv_bias: bool = True,
        chunk_size: int = 256,
        use_kernels: str = "auto",
    ) -> None:
        super().__init__()
        d_inner = int(expand * d_model)
        d_ssm = d_inner if d_ssm is None else int(d_ssm)
        if not 0 < d_ssm <= d_inner:
            raise ValueError(f"d_ssm must be in (0, expand * d_model = {d_inner}], got {d_ssm}")
        if d_ssm % headdim:
            raise ValueError(f"d_ssm ({d_ssm}) must be a multiple of headdim ({headdim})")
        nheads = d_ssm // headdim
        if nheads % ngroups:
            raise ValueError(
                f"the number of heads ({nheads} = d_ssm / headdim) must be a multiple of ngroups ({ngroups})"
            )
        lo, hi = (float(v) for v in A_init_range)
        if not 0 < lo <= hi:
            raise ValueError(f"A_init_range must satisfy 0 < low <= high, got {list(A_init_range)}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        self.kernel_limits = kernel_limits("mamba2", d_conv=d_conv)
        check_use_kernels(use_kernels, mamba2_kernels, "mamba2", self.kernel_limits)
        self.d_model, self.layer_idx = d_model, layer_idx
        self.d_state, self.d_conv, self.expand, self.headdim = d_state, d_conv, expand, headdim
        self.d_inner, self.d_ssm, self.nheads, self.ngroups = d_inner, d_ssm, nheads, ngroups
        self.A_init_range = (lo, hi)
        self.D_has_hdim, self.rmsnorm = D_has_hdim, rmsnorm
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.chunk_size, self.use_kernels = chunk_size, use_kernels
        self.d_mlp = d_inner - d_ssm  # channels that bypass the SSM as a gated MLP (0 by default)
        self.conv_dim = d_ssm + 2 * ngroups * d_state
        self.fused_layout = self._fused_layout_reason()

        # in_proj output order: [z0, x0 (gated MLP), z, x, B, C, dt]
        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * ngroups * d_state + nheads, bias=bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1, bias=conv_bias
        )
        self.dt_bias = nn.Parameter(torch.empty(nheads))
        self.A_log = nn.Parameter(torch.empty(nheads))
        self.D = nn.Parameter(torch.empty(d_ssm if D_has_hdim else nheads))
        if rmsnorm:
            self.norm = RMSNormGated(
                d_ssm, eps=norm_eps, group_size=d_ssm // ngroups, norm_before_gate=norm_before_gate
            )
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self._init_ssm_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise every parameter (e.g. after ``to_empty`` from the meta device)."""
        for module in (self.in_proj, self.conv1d, self.out_proj):
            module.reset_parameters()
        if self.rmsnorm:
            self.norm.reset_parameters()
        self._init_ssm_parameters()

    @torch.no_grad()
    def _init_ssm_parameters(self) -> None:
        """mamba_ssm's initialisation: softplus(dt_bias) log-uniform in [dt_min, dt_max]; A uniform in
        A_init_range (A_log = log A); D = 1. Works on the meta device."""
        device = self.dt_bias.device
        dt = torch.exp(
            torch.rand(self.nheads, device=device) * (math.log(self.dt_max) - math.log(self.dt_min))
            + math.log(self.dt_min)
        ).clamp(min=self.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log.copy_(torch.empty(self.nheads, device=device).uniform_(*self.A_init_range).log())
        self.D.fill_(1.0)

    def allocate_cache(
        self,
        batch_size: int,
        max_len: int,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> Mamba2State:
        """Zeroed decoding state; its size does not depend on ``max_len``."""
        device = device or self.out_proj.weight.device
        conv_dtype = dtype or self.conv1d.weight.dtype
        # channel-last memory, as mamba_ssm allocates it for causal_conv1d_update
        conv = torch.zeros(batch_size, self.d_conv, self.conv_dim, device=device, dtype=conv_dtype)
        conv = conv.transpose(1, 2)
        ssm = torch.zeros(
            batch_size,
            self.nheads,
            self.headdim,
            self.d_state,
            device=device,
            dtype=dtype or self.in_proj.weight.dtype,
        )
        return Mamba2State(conv, ssm)

    def _split(self, zxbcdt: Tensor) -> tuple[Tensor, ...]:
        return torch.split(zxbcdt, [self.d_mlp, self.d_mlp, self.d_ssm, self.conv_dim, self.nheads], dim=-1)

    def _D(self) -> Tensor:
        return self.D.view(self.nheads, self.headdim) if self.D_has_hdim else self.D

    def _fused_layout_reason(self) -> str:
        """Why ``mamba_split_conv1d_scan_combined`` cannot take this mixer's layout, or "".

        It hands causal_conv1d the xBC slice of in_proj's output as a channel-last view (mamba-ssm 2.2.5-2.2.6
        copy it channel-first when in_proj's width is not a multiple of 8, 2.3 asserts conv channels % 8 == 0),
        and the channel-last kernel needs channels, strides (the in_proj width) and the slice's start (2 d_mlp +
        d_ssm) in multiples of 8; the gated RMSNorm refuses groups above 64 KB. Requiring all of them keeps
        every mamba-ssm >= 2.2.5 on its tested channel-last path, with or without ``seq_idx``.
        """
        width = 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads
        checks = (
            (self.conv_dim % 8 == 0, f"conv channels {self.conv_dim} not a multiple of 8"),
            (width % 8 == 0, f"in_proj width {width} not a multiple of 8"),
            (
                (2 * self.d_mlp + self.d_ssm) % 8 == 0,
                f"xBC offset {2 * self.d_mlp + self.d_ssm} not a multiple of 8",
            ),
            (
                not self.rmsnorm or self.d_ssm // self.ngroups <= FUSED_NORM_MAX_GROUP,
                f"norm group {self.d_ssm // self.ngroups} above {FUSED_NORM_MAX_GROUP}",
            ),
        )
        return "; ".join(why for ok, why in checks if not ok)

    def _check_seq_idx(self, seq_idx: Tensor | None, x: Tensor, state: Mamba2State | None) -> Tensor | None:
        if seq_idx is None:
            return None
        if state is not None:
            raise ValueError("mamba2: seq_idx (packed sequences) is not supported with a decoding state")
        if seq_idx.shape != x.shape[:2] or seq_idx.dtype.is_floating_point or seq_idx.dtype == torch.bool:
            raise ValueError(
                f"mamba2: seq_idx must be integers of shape [batch, seqlen] = {list(x.shape[:2])}, "
                f"got {seq_idx.dtype} {list(seq_idx.shape)}"
            )
        return seq_idx.to(device=x.device, dtype=torch.int32).contiguous()  # what causal_conv1d requires

    def _output(self, y: Tensor, z: Tensor, z0: Tensor, x0: Tensor) -> Tensor:
        """Gate/normalise the SSM output y [..., d_ssm], prepend the gated-MLP channels, project out."""
        y = self.norm(y, z) if self.rmsnorm else y * F.silu(z)
        if self.d_mlp > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return self.out_proj(y)

    def forward(
        self, x: Tensor, state: Mamba2State | None = None, *, seq_idx: Tensor | None = None
    ) -> Tensor:
        """x: [B, L, d_model] -> [B, L, d_model].

        With ``state`` (from ``allocate_cache``) continue from it and update it in place: L > 1 is a prefill,
        L == 1 one decoding step. ``seq_idx`` [B, L] (integers, non-decreasing from 0) marks packed sequences:
        nothing crosses from one to the next.
        """
        seq_idx = self._check_seq_idx(seq_idx, x, state)
        limits = self.kernel_limits
        if seq_idx is not None and self.conv_dim % 8:
            limits = "; ".join(
                filter(None, [limits, f"seq_idx needs conv channels % 8 == 0 (got {self.conv_dim})"])
            )
        kernels = select_kernels(self.use_kernels, mamba2_kernels, x, "mamba2", limits)
        valid = valid_positions(state, x.shape[1])  # [B, L] False at left padding, or None
        if state is not None and x.shape[1] == 1:
            out = self._step(x[:, 0], state, kernels).unsqueeze(1)
        elif kernels is not None and state is None and self._use_fused(kernels):
            out = self._forward_fused(x, kernels, seq_idx)
        else:
            out = self._forward_seq(x, state, kernels, seq_idx, valid)
        if state is not None:
            state.seqlen_offset += x.shape[1]
        return out

    def _use_fused(self, k) -> bool:
        if k.mamba_split_conv1d_scan_combined is None:
            log_path_once(
                "mamba2", "causal_conv1d_fn + mamba_chunk_scan_combined", k.fused_reason, logging.WARNING
            )
            return False
        if self.fused_layout:
            log_path_once("mamba2", "causal_conv1d_fn + mamba_chunk_scan_combined", self.fused_layout)
            return False
        return True

    def _forward_fused(self, x: Tensor, k, seq_idx: Tensor | None) -> Tensor:
        """Upstream's training path (``Mamba2.forward`` with ``use_mem_eff_path``): one fused autograd function
        from in_proj's output to out_proj's, recomputing the conv and the scan in backward."""
        return k.mamba_split_conv1d_scan_combined(
            self.in_proj(x),
            self.conv1d.weight.squeeze(1),  # [conv_dim, d_conv]
            self.conv1d.bias,
            self.dt_bias,
            -torch.exp(self.A_log.float()),
            D=self._D(),
            chunk_size=self.chunk_size,
            seq_idx=seq_idx,
            activation="silu",
            rmsnorm_weight=self.norm.weight if self.rmsnorm else None,
            rmsnorm_eps=self.norm.eps if self.rmsnorm else 1e-6,
            outproj_weight=self.out_proj.weight,
            outproj_bias=self.out_proj.bias,
            headdim=None if self.D_has_hdim else self.headdim,
            ngroups=self.ngroups,
            norm_before_gate=self.norm.norm_before_gate if self.rmsnorm else False,
        )

    def _forward_seq(
        self,
        x: Tensor,
        state: Mamba2State | None,
        k,
        seq_idx: Tensor | None = None,
        valid: Tensor | None = None,
    ) -> Tensor:
        batch, seqlen, _ = x.shape
        z0, x0, z, xBC, dt = self._split(self.in_proj(x))
        if valid is not None:  # left padding: no conv input (masked_fill: whatever the padded rows hold)
            xBC = xBC.masked_fill(~valid.unsqueeze(-1), 0.0)
            dt = F.softplus(dt.float() + self.dt_bias.float()).masked_fill_(~valid.unsqueeze(-1), 0.0)
        xBC_t = xBC.transpose(1, 2)  # [B, conv_dim, L], channel-last in memory
        weight = self.conv1d.weight.squeeze(1)
        fresh = state is None or state.seqlen_offset == 0
        if k is not None and k.causal_conv1d_fn is not None and fresh:
            # the view itself when the channel-last kernel can read it, else a copy (kernels.conv_input)
            conv_out = k.causal_conv1d_fn(
                conv_input(xBC_t, channel_last=seq_idx is not None),
                weight,
                self.conv1d.bias,
                seq_idx=seq_idx,
                activation="silu",
            )
        else:
            prefix = None if state is None else state.conv_state[..., 1:]
            training = torch.is_grad_enabled() and (
                x.requires_grad or any(p.requires_grad for p in self.parameters())
            )
            if seq_idx is None and not training:  # inference: sequence-major, [B, L, conv_dim]
                conv_out = causal_conv1d_seq(xBC, weight, self.conv1d.bias, prefix=prefix).transpose(1, 2)
            else:
                conv_out = causal_conv1d(xBC_t, weight, self.conv1d.bias, prefix=prefix, seq_idx=seq_idx)
        if state is not None:
            state.conv_state.copy_(last_inputs(xBC_t, state.conv_state))
        xs, B, C = torch.split(
            conv_out.transpose(1, 2),
            [self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state],
            dim=-1,
        )
        xs = xs.unflatten(-1, (self.nheads, self.headdim))  # [B, L, H, P]
        B = B.unflatten(-1, (self.ngroups, self.d_state))  # [B, L, G, N]
        C = C.unflatten(-1, (self.ngroups, self.d_state))
        initial = None if fresh else state.ssm_state
        y = self._scan(xs, dt, B, C, initial, state is not None, k, seq_idx, dt_ready=valid is not None)
        y = keep_last_state(y, state)
        return self._output(y.reshape(batch, seqlen, self.d_ssm), z, z0, x0)

    @property
    def torch_chunk_size(self) -> int:
        """The chunk of the PyTorch SSD path (``SSD_CHUNK``, sized for CPUs); ``chunk_size`` is the kernel's."""
        return SSD_CHUNK

    def ssd(
        self,
        x: Tensor,
        dt: Tensor,
        B: Tensor,
        C: Tensor,
        initial_state: Tensor | None = None,
        return_final_state: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The SSD scan alone, with this mixer's ``A_log``, ``D`` and ``dt_bias``: the step of ``forward`` between
        the causal conv and the gated norm (``mamba_chunk_scan_combined`` with the CUDA kernels, else
        ``ssd_chunked`` with ``torch_chunk_size``).

        Args:
            x: [B, L, nheads, headdim]. dt: [B, L, nheads], before ``dt_bias`` and softplus.
            B, C: [B, L, ngroups, d_state]. initial_state: [B, nheads, headdim, d_state] (zeros when None).
        Returns:
            y [B, L, nheads, headdim], and the final state [B, nheads, headdim, d_state] when
            ``return_final_state``.
        """
        kernels = select_kernels(self.use_kernels, mamba2_kernels, x, "mamba2")
        return self._scan(x, dt, B, C, initial_state, return_final_state, kernels)

    def _scan(
        self,
        xs: Tensor,
        dt: Tensor,
        B: Tensor,
        C: Tensor,
        initial: Tensor | None,
        return_final: bool,
        k,
        seq_idx: Tensor | None = None,
        dt_ready: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``dt_ready``: dt is already softplus(dt + dt_bias) (the padded path), so the scan applies neither."""
        A = -torch.exp(self.A_log.float())
        dt_bias, softplus = (None, False) if dt_ready else (self.dt_bias, True)
        if k is not None:
            return k.mamba_chunk_scan_combined(
                xs,
                dt,
                A,
                B,
                C,
                chunk_size=self.chunk_size,
                D=self._D(),
                z=None,
                dt_bias=dt_bias,
                initial_states=initial,
                seq_idx=seq_idx,
                dt_softplus=softplus,
                return_final_states=return_final,
            )
        return ssd_chunked(
            xs,
            dt,
            A,
            B,
            C,
            D=self._D(),
            dt_bias=dt_bias,
            dt_softplus=softplus,
            initial_state=initial,
            return_final_state=return_final,
            chunk_size=self.torch_chunk_size,
            seq_idx=seq_idx,
        )

    def _step(self, x: Tensor, state: Mamba2State, k) -> Tensor:
        """One token. x: [B, d_model] -> [B, d_model]; updates ``state`` in place (mamba_ssm's ``step``)."""
        z0, x0, z, xBC, dt = self._split(self.in_proj(x))
        weight = self.conv1d.weight.squeeze(1)
        if k is not None and k.causal_conv1d_update is not None:
            # the kernel wants the input in the state's dtype (bf16 autocast makes xBC bf16, the state is fp32)
            xBC = k.causal_conv1d_update(
                xBC.to(state.conv_state.dtype), state.conv_state, weight, self.conv1d.bias, "silu"
            ).to(xBC.dtype)
        else:
            xBC = conv_step(xBC, state.conv_state, weight, self.conv1d.bias)
        xs, B, C = torch.split(
            xBC, [self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1
        )
        xs = xs.view(-1, self.nheads, self.headdim)  # [B, H, P]
        B = B.view(-1, self.ngroups, self.d_state)  # [B, G, N]
        C = C.view(-1, self.ngroups, self.d_state)
        A = -torch.exp(self.A_log.float())  # [H]
        if k is not None and k.selective_state_update is not None:
            P, N = self.headdim, self.d_state
            y = k.selective_state_update(
                state.ssm_state,
                xs,
                dt.unsqueeze(-1).expand(-1, -1, P),
                A[:, None, None].expand(-1, P, N),
                B,
                C,
                self._D() if self.D_has_hdim else self.D.unsqueeze(-1).expand(-1, P),
                z=None,
                dt_bias=self.dt_bias.unsqueeze(-1).expand(-1, P),
                dt_softplus=True,
            )
        else:
            per_group = self.nheads // self.ngroups
            B = B.float().repeat_interleave(per_group, dim=1)  # [B, H, N]
            C = C.float().repeat_interleave(per_group, dim=1)
            dt = F.softplus(dt.float() + self.dt_bias.float())  # [B, H]
            h = state.ssm_state.float() * torch.exp(dt * A)[..., None, None]
            h = h + (xs.float() * dt.unsqueeze(-1)).unsqueeze(-1) * B.unsqueeze(2)
            state.ssm_state.copy_(h)
            D = self._D().float()
            y = torch.einsum("bhpn,bhn->bhp", h, C) + xs.float() * (D if self.D_has_hdim else D.unsqueeze(-1))
            y = y.to(x.dtype)
        return self._output(y.reshape(-1, self.d_ssm), z, z0, x0)
