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

Inference (no gradient needed): the PyTorch path convolves in sequence-major layout (``causal_conv1d_seq``) and
scans with ``selective_scan``'s forward-only path; one token updates the state in place. On a CPU with numba
(``components/cpu_kernels.py``) a decoder layer's whole mixer half at one token (pre-norm, mixer, residual) is
one compiled call (``residual_step``), and the prefill's scan one pass per thread. Left padding
(``state.pad``, batched generation): the padded positions' conv inputs and time steps are zeroed, so the state
stays exactly zero through them (``exp(0 * A) = 1``, no input) and the conv window of the first real token
sees zeros, as at the start of a sequence.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components import cpu_kernels
from components.mixers.causal_conv import causal_conv1d, causal_conv1d_seq, conv_step, last_inputs
from components.mixers.kernels import (
    check_use_kernels,
    conv_input,
    kernel_limits,
    log_path_once,
    mamba1_kernels,
    select_kernels,
)
from components.mixers.selective_scan import LOG2E, selective_scan
from components.mixers.ssm_state import SSMState, keep_last_state, valid_positions
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
        valid = valid_positions(state, x.shape[1])  # [B, L] False at left padding, or None
        if state is not None and x.shape[1] == 1:
            out = self._step(x[:, 0], state, kernels)
        elif kernels is not None and (state is None or state.seqlen_offset == 0):
            out = self._forward_kernels(x, state, kernels, valid)
        else:
            out = self._forward_torch(x, state, valid)
        if state is not None:
            state.seqlen_offset += x.shape[1]
        return out

    def residual_step(self, norm: nn.Module, x: Tensor, state: MambaState | None = None) -> Tensor | None:
        """``x + self(norm(x))`` for one decoding token on a CPU in one numba call (``cpu_kernels``); None where
        that does not apply (``DecoderLayer`` then runs the norm, ``forward`` and the sum), including for a
        subclass that overrides the step: the kernel computes this class's math."""
        # device, dtype, grad mode, rows: cpu_kernels checks them
        if state is None or x.shape[1] != 1 or self.use_kernels != "auto":
            return None
        if type(self).forward is not Mamba.forward or type(self)._step_torch is not Mamba._step_torch:
            return None
        out = cpu_kernels.mamba1_residual_step(self, norm, x, state.conv_state, state.ssm_state)
        if out is not None:
            log_path_once("mamba", "numba one-token step (CPU)")
            state.seqlen_offset += 1
        return out

    def _forward_torch(self, x: Tensor, state: MambaState | None, valid: Tensor | None = None) -> Tensor:
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # [B, L, d_inner] each
        if valid is not None:  # left padding: no conv input (masked_fill: whatever the padded rows hold)
            xs = xs.masked_fill(~valid.unsqueeze(-1), 0.0)
        weight = self.conv1d.weight.squeeze(1)
        prefix = None if state is None else state.conv_state[..., 1:]
        if self._needs_grad(x):
            u = causal_conv1d(xs.transpose(1, 2), weight, self.conv1d.bias, prefix=prefix)  # [B, d_inner, L]
            u = u.transpose(1, 2)  # [B, L, d_inner]
        else:
            u = causal_conv1d_seq(xs, weight, self.conv1d.bias, prefix=prefix)  # [B, L, d_inner]
        if state is not None:
            state.conv_state.copy_(last_inputs(xs.transpose(1, 2), state.conv_state))
        dt, B, C = self._dt_B_C(u)
        A = -torch.exp(self.A_log.float())
        bias, softplus = self.dt_proj.bias, True
        if valid is not None:  # time step 0 at the padding: the state passes through unchanged (zero)
            dt, bias, softplus = self._padded_dt(dt, valid), None, False
        result = selective_scan(
            u,
            dt,
            A,
            B,
            C,
            self.D,
            z,
            delta_bias=bias,
            delta_softplus=softplus,
            initial_state=state.ssm_state if state is not None and state.seqlen_offset > 0 else None,
            return_last_state=state is not None,
        )
        return self.out_proj(keep_last_state(result, state))

    def _needs_grad(self, x: Tensor) -> bool:
        """Whether this forward builds an autograd graph (training); otherwise the inference paths run."""
        return torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        )

    def _padded_dt(self, dt: Tensor, valid: Tensor) -> Tensor:
        """softplus(dt + dt_bias) in fp32, exactly 0 where ``valid`` is False ([B, L, d_inner])."""
        delta = F.softplus(dt.float() + self.dt_proj.bias.float())
        return delta.masked_fill_(~valid.unsqueeze(-1), 0.0)

    def _forward_kernels(self, x: Tensor, state: MambaState | None, k, valid: Tensor | None = None) -> Tensor:
        """mamba_ssm's CUDA path (``Mamba.forward``); a fresh ``state`` is filled as mamba_ssm's prefill does
        (with left padding ``valid``: zero conv inputs and time steps there, as on the PyTorch path)."""
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
        if valid is not None:
            xs = xs.masked_fill(~valid.unsqueeze(1), 0.0)
        if state is not None:
            state.conv_state.copy_(F.pad(xs, (self.d_conv - seqlen, 0)))
        # xs is a channel-last view: passed as is when the channel-last kernel can read it (d_inner % 8 == 0),
        # else as a channel-first copy, which has no constraint (kernels.conv_input)
        u = k.causal_conv1d_fn(conv_input(xs), weight, self.conv1d.bias, activation="silu")  # [B, d_inner, L]
        dt, B, C = self._dt_B_C(u.transpose(1, 2))
        bias, softplus = self.dt_proj.bias.float(), True
        if valid is not None:  # the kernel reads delta in u's dtype
            dt, bias, softplus = self._padded_dt(dt, valid).to(u.dtype), None, False
        result = k.selective_scan_fn(
            u,
            dt.transpose(1, 2).contiguous(),
            A,
            B.transpose(1, 2).contiguous(),
            C.transpose(1, 2).contiguous(),
            self.D.float(),
            z=z,
            delta_bias=bias,
            delta_softplus=softplus,
            return_last_state=state is not None,
        )
        return self.out_proj(keep_last_state(result, state).transpose(1, 2))  # y: [B, d_inner, L]

    def _step(self, x: Tensor, state: MambaState, k) -> Tensor:
        """One token. x: [B, d_model] -> [B, 1, d_model]; updates ``state`` in place (mamba_ssm's ``step``)."""
        if k is None and state.ssm_state.dtype == torch.float32 and not torch.is_grad_enabled():
            return self._step_torch(x, state)
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
        if k is not None and k.selective_state_update is not None:
            A = -torch.exp(self.A_log.float())
            y = k.selective_state_update(
                state.ssm_state, u, dt, A, B, C, self.D, z=z, dt_bias=self.dt_proj.bias, dt_softplus=True
            )
        else:
            if k is not None:
                log_path_once("mamba", "PyTorch one-token step", "selective_state_update (Triton) is missing")
            # exp(dt A) as exp2(dt A log2 e): torch's exp hands tensors above 2048 elements to a thread pool
            # (MKL VML), which costs more than the math for one token, and stalls on a busy machine
            A2 = torch.exp2(self.A_log.float() * LOG2E).mul_(-LOG2E)  # A * log2(e), [d_inner, d_state]
            dt = F.softplus(dt.float() + self.dt_proj.bias.float())  # [B, d_inner]
            u32 = u.float()
            dA = torch.mul(dt.unsqueeze(-1), A2).exp2_()  # [B, d_inner, d_state]
            if state.ssm_state.dtype == torch.float32:  # in place: a handful of operations per token
                h = state.ssm_state.mul_(dA)
                h.addcmul_((dt * u32).unsqueeze(-1), B.float().unsqueeze(1))
            else:
                h = state.ssm_state.float() * dA + (dt * u32).unsqueeze(-1) * B.float().unsqueeze(1)
                state.ssm_state.copy_(h)
            y = torch.bmm(h, C.float().unsqueeze(-1)).squeeze(-1)  # [B, d_inner]
            y = y.addcmul_(u32, self.D.float()).mul_(F.silu(z.float())).to(x.dtype)
        return self.out_proj(y).unsqueeze(1)

    def _step_torch(self, x: Tensor, state: MambaState) -> Tensor:
        """``_step`` on the PyTorch path for an fp32 state without autograd (decoding): the same math in the
        fewest operations, since at one token each costs more than its arithmetic. Parameters are read directly
        (no module calls), the state is updated in place, and the decays are ``exp2(dt * A log2 e)`` with
        ``A log2 e`` cached until ``A_log`` changes (torch's ``exp`` hands tensors above 2,048 elements to a
        thread pool, which costs more than the math for one token and stalls on a busy machine)."""
        xs, z = F.linear(x, self.in_proj.weight, self.in_proj.bias).chunk(2, dim=-1)  # [B, d_inner]
        u = conv_step(xs, state.conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias)
        dt, B, C = torch.split(
            F.linear(u, self.x_proj.weight), [self.dt_rank, self.d_state, self.d_state], dim=-1
        )
        if self.inner_norms:
            dt, B, C = _rms(self.dt_layernorm, dt), _rms(self.b_layernorm, B), _rms(self.c_layernorm, C)
        dt = F.softplus(F.linear(dt, self.dt_proj.weight, self.dt_proj.bias).float())  # [B, d_inner]
        u32 = u.float()
        h = state.ssm_state.mul_(torch.mul(dt.unsqueeze(-1), self._decay_rates()).exp2_())  # [B, d_inner, N]
        h.addcmul_((dt * u32).unsqueeze(-1), B.float().unsqueeze(1))
        y = torch.bmm(h, C.float().unsqueeze(-1)).squeeze(-1)  # [B, d_inner]
        y = y.addcmul_(u32, self.D.float()).mul_(F.silu(z.float()))
        return F.linear(y.to(x.dtype), self.out_proj.weight, self.out_proj.bias).unsqueeze(1)

    def _decay_rates(self) -> Tensor:
        """``A * log2(e)`` = -exp(A_log) log2(e), [d_inner, d_state] fp32, recomputed only when ``A_log`` changes
        (in place: its version counter; moved or cast: its storage)."""
        key = (self.A_log._version, self.A_log.data_ptr(), self.A_log.device)
        cached = getattr(self, "_decay_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, torch.exp2(self.A_log.detach().float() * LOG2E).mul_(-LOG2E))
            self._decay_cache = cached
        return cached[1]
