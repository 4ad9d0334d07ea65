"""Mamba-1 mixer: the selective state-space layer of Gu & Dao, "Mamba: Linear-Time Sequence Modeling with
Selective State Spaces" (arXiv 2312.00752); reference code ``mamba_ssm/modules/mamba_simple.py``.

Parameter names and shapes are exactly those of ``mamba_ssm.Mamba`` (and of transformers' ``MambaMixer``), so a
state dict moves between this module, ``mamba_ssm`` and transformers. ``inner_norms=True`` adds Jamba's RMSNorms
on dt, B and C (``dt_layernorm``, ``b_layernorm``, ``c_layernorm``, as in transformers' ``JambaMambaMixer``;
LongLLaVA uses them)::

    x ─ in_proj ─┬─ xs ─ causal conv1d ─ SiLU ─┬─ x_proj ─ dt, B, C ─(norms)─ dt_proj ─┐
                 │                             └──────────────── u ──────────────────── selective scan ─ y
                 └─ z ──────────────────────────────────────────────────────── y * silu(z) ─ out_proj ─►

Paths (``use_kernels``; the kernels are probed lazily in ``kernels.py``): on CUDA tensors with ``mamba_ssm`` and
``causal_conv1d`` importable, training runs upstream's fused ``mamba_inner_fn`` (conv, projections and scan in one
autograd function, recomputed in backward); Jamba's inner norms, a prefill into a decoding state, or a fused
function that cannot run (a mamba-ssm / causal-conv1d version mismatch) use ``causal_conv1d_fn`` +
``selective_scan_fn``; one token uses ``causal_conv1d_update`` + ``selective_state_update``. Otherwise (CPU,
``never``, or sizes the kernels refuse: d_conv outside 2-4, d_state above 256) the pure-PyTorch path
(``causal_conv.py``, ``selective_scan.py``) computes the same math (fp32 scan) with the same parameters.
Packed sequences (``seq_idx``) are not supported: mamba_ssm's Mamba-1 scan has no such argument.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.mixers.causal_conv import causal_conv1d, conv_step, last_inputs
from components.mixers.kernels import (
    check_use_kernels,
    conv_input,
    kernel_limits,
    log_path_once,
    mamba1_kernels,
    select_kernels,
)
from components.mixers.selective_scan import selective_scan
from components.mixers.ssm_state import SSMState, keep_last_state
from toolkit.registry import register


@dataclass
class MambaState(SSMState):
    """Decoding state of one Mamba-1 mixer.

    conv_state: [B, d_inner, d_conv], the last ``d_conv`` conv inputs. ssm_state: [B, d_inner, d_state].
    """


def _rms(norm: nn.RMSNorm, x: Tensor) -> Tensor:
    """RMSNorm computed in fp32 whatever the input/weight dtypes (as Jamba's JambaRMSNorm does)."""
    return F.rms_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.eps).to(x.dtype)


@register("mixer", "mamba", symbol="m")
class Mamba(nn.Module):
    """Mamba-1 selective SSM mixer (mamba_ssm names; optional Jamba inner RMSNorms on dt, B, C)."""

    def __init__(
        self,
        d_model: int,
        *,
        layer_idx: int = 0,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        inner_norms: bool = False,
        norm_eps: float = 1e-6,
        use_kernels: str = "auto",
    ) -> None:
        super().__init__()
        if dt_rank != "auto" and (not isinstance(dt_rank, int) or dt_rank < 1):
            raise ValueError(f"dt_rank must be 'auto' or a positive integer, got {dt_rank!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        self.kernel_limits = kernel_limits("mamba", d_conv=d_conv, d_state=d_state)
        check_use_kernels(use_kernels, mamba1_kernels, "mamba", self.kernel_limits)
        self.d_model, self.layer_idx = d_model, layer_idx
        self.d_state, self.d_conv, self.expand = d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.inner_norms, self.use_kernels = inner_norms, use_kernels

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1, bias=conv_bias
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        if inner_norms:
            self.dt_layernorm = nn.RMSNorm(self.dt_rank, eps=norm_eps)
            self.b_layernorm = nn.RMSNorm(d_state, eps=norm_eps)
            self.c_layernorm = nn.RMSNorm(d_state, eps=norm_eps)
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self.dt_proj.bias._no_reinit = True  # a model-level init that zeroes biases must keep this one
        self._init_ssm_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise every parameter (e.g. after ``to_empty`` from the meta device)."""
        for module in (self.in_proj, self.conv1d, self.x_proj, self.out_proj):
            module.reset_parameters()
        if self.inner_norms:
            for norm in (self.dt_layernorm, self.b_layernorm, self.c_layernorm):
                norm.reset_parameters()
        self._init_ssm_parameters()

    @torch.no_grad()
    def _init_ssm_parameters(self) -> None:
        """mamba_ssm's initialisation: dt_proj so that softplus(bias) is log-uniform in [dt_min, dt_max]; S4D-real
        A (A_log[d, n] = log(n + 1)); D = 1. Works on the meta device."""
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(
            torch.rand(self.d_inner, device=self.dt_proj.bias.device)
            * (math.log(self.dt_max) - math.log(self.dt_min))
            + math.log(self.dt_min)
        ).clamp(min=self.dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
        self.A_log.copy_(torch.log(A).expand(self.d_inner, -1))
        self.D.fill_(1.0)

    def allocate_cache(
        self,
        batch_size: int,
        max_len: int,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> MambaState:
        """Zeroed decoding state; its size does not depend on ``max_len``."""
        device = device or self.out_proj.weight.device
        return MambaState(
            torch.zeros(
                batch_size, self.d_inner, self.d_conv, device=device, dtype=dtype or self.conv1d.weight.dtype
            ),
            torch.zeros(
                batch_size,
                self.d_inner,
                self.d_state,
                device=device,
                dtype=dtype or self.in_proj.weight.dtype,
            ),
        )

    def _dt_B_C(self, xs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """xs [..., d_inner] -> dt [..., d_inner] (before bias/softplus), B and C [..., d_state]."""
        dt, B, C = torch.split(self.x_proj(xs), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.inner_norms:
            dt, B, C = _rms(self.dt_layernorm, dt), _rms(self.b_layernorm, B), _rms(self.c_layernorm, C)
        return F.linear(dt, self.dt_proj.weight), B, C

    def forward(self, x: Tensor, state: MambaState | None = None) -> Tensor:
        """x: [B, L, d_model] -> [B, L, d_model].

        With ``state`` (from ``allocate_cache``) continue from it and update it in place: L > 1 is a prefill,
        L == 1 one decoding step.
        """
        kernels = select_kernels(self.use_kernels, mamba1_kernels, x, "mamba", self.kernel_limits)
        if state is not None and x.shape[1] == 1:
            out = self._step(x[:, 0], state, kernels)
        elif kernels is not None and (state is None or state.seqlen_offset == 0):
            out = self._forward_kernels(x, state, kernels)
        else:
            out = self._forward_torch(x, state)
        if state is not None:
            state.seqlen_offset += x.shape[1]
        return out

    def _forward_torch(self, x: Tensor, state: MambaState | None) -> Tensor:
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # [B, L, d_inner] each
        xs_t = xs.transpose(1, 2)  # [B, d_inner, L]
        weight = self.conv1d.weight.squeeze(1)
        if state is None:
            u = causal_conv1d(xs_t, weight, self.conv1d.bias)
        else:
            u = causal_conv1d(xs_t, weight, self.conv1d.bias, prefix=state.conv_state[..., 1:])
            state.conv_state.copy_(last_inputs(xs_t, state.conv_state))
        u = u.transpose(1, 2)  # [B, L, d_inner]
        dt, B, C = self._dt_B_C(u)
        A = -torch.exp(self.A_log.float())
        result = selective_scan(
            u,
            dt,
            A,
            B,
            C,
            self.D,
            z,
            delta_bias=self.dt_proj.bias,
            delta_softplus=True,
            initial_state=state.ssm_state if state is not None and state.seqlen_offset > 0 else None,
            return_last_state=state is not None,
        )
        return self.out_proj(keep_last_state(result, state))

    def _forward_kernels(self, x: Tensor, state: MambaState | None, k) -> Tensor:
        """mamba_ssm's CUDA path (``Mamba.forward``); a fresh ``state`` is filled as mamba_ssm's prefill does."""
        seqlen = x.shape[1]
        xz = self.in_proj(x).transpose(1, 2)  # [B, 2*d_inner, L]
        A = -torch.exp(self.A_log.float())
        weight = self.conv1d.weight.squeeze(1)
        if state is None and not self.inner_norms and k.mamba_inner_fn is None:
            log_path_once("mamba", "causal_conv1d_fn + selective_scan_fn", k.inner_reason, logging.WARNING)
        if state is None and not self.inner_norms and k.mamba_inner_fn is not None:
            # xz is channel-last in memory; mamba_inner_fn makes it contiguous (channel-first) for the conv
            return k.mamba_inner_fn(
                xz,
                self.conv1d.weight,
                self.conv1d.bias,
                self.x_proj.weight,
                self.dt_proj.weight,
                self.out_proj.weight,
                self.out_proj.bias,
                A,
                None,
                None,
                self.D.float(),
                delta_bias=self.dt_proj.bias.float(),
                delta_softplus=True,
            )
        xs, z = xz.chunk(2, dim=1)
        if state is not None:
            state.conv_state.copy_(F.pad(xs, (self.d_conv - seqlen, 0)))
        # xs is a channel-last view: passed as is when the channel-last kernel can read it (d_inner % 8 == 0),
        # else as a channel-first copy, which has no constraint (kernels.conv_input)
        u = k.causal_conv1d_fn(conv_input(xs), weight, self.conv1d.bias, activation="silu")  # [B, d_inner, L]
        dt, B, C = self._dt_B_C(u.transpose(1, 2))
        result = k.selective_scan_fn(
            u,
            dt.transpose(1, 2).contiguous(),
            A,
            B.transpose(1, 2).contiguous(),
            C.transpose(1, 2).contiguous(),
            self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            return_last_state=state is not None,
        )
        return self.out_proj(keep_last_state(result, state).transpose(1, 2))  # y: [B, d_inner, L]

    def _step(self, x: Tensor, state: MambaState, k) -> Tensor:
        """One token. x: [B, d_model] -> [B, 1, d_model]; updates ``state`` in place (mamba_ssm's ``step``)."""
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # [B, d_inner]
        weight = self.conv1d.weight.squeeze(1)
        if k is not None:
            # the kernel wants the input in the state's dtype (bf16 autocast makes xs bf16, the state is fp32)
            u = k.causal_conv1d_update(
                xs.to(state.conv_state.dtype), state.conv_state, weight, self.conv1d.bias, "silu"
            ).to(xs.dtype)
        else:
            u = conv_step(xs, state.conv_state, weight, self.conv1d.bias)
        dt, B, C = self._dt_B_C(u)
        A = -torch.exp(self.A_log.float())
        if k is not None and k.selective_state_update is not None:
            y = k.selective_state_update(
                state.ssm_state, u, dt, A, B, C, self.D, z=z, dt_bias=self.dt_proj.bias, dt_softplus=True
            )
        else:
            if k is not None:
                log_path_once("mamba", "PyTorch one-token step", "selective_state_update (Triton) is missing")
            dt = F.softplus(dt.float() + self.dt_proj.bias.float())  # [B, d_inner]
            h = state.ssm_state.float() * torch.exp(dt.unsqueeze(-1) * A)
            h = h + (dt * u.float()).unsqueeze(-1) * B.float().unsqueeze(1)
            state.ssm_state.copy_(h)
            y = torch.einsum("bdn,bn->bd", h, C.float()) + u.float() * self.D.float()
            y = (y * F.silu(z.float())).to(x.dtype)
        return self.out_proj(y).unsqueeze(1)
