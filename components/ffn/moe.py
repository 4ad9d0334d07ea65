"""Top-k mixture of SwiGLU experts with a Switch-style load-balancing loss.

Shazeer et al., "Outrageously Large Neural Networks" (arXiv 1701.06538) for top-k routing; Fedus et al.,
"Switch Transformers" (arXiv 2101.03961) for the auxiliary loss; Jamba (arXiv 2403.19887) for the layout used
here: a bias-free ``router`` Linear, softmax over all experts, the top-k probabilities used as weights without
renormalisation (``norm_topk_prob=True`` renormalises, as Mixtral does), experts named ``experts.{i}.gate_proj``
/ ``up_proj`` / ``down_proj`` (the layout of Jamba's released checkpoints).

With ``n_experts == 1`` the block is a plain SwiGLU (``gate_proj``, ``up_proj``, ``down_proj``, no router), as
transformers' JambaForCausalLM builds it, so parameter counts and weights match the released Jamba/LongLLaVA 9B.

Dispatch sorts the (token, expert) assignments by expert and runs each expert once on its contiguous slice:
no expert ever computes a token it was not routed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toolkit.registry import register


class Expert(nn.Module):
    """One SwiGLU expert: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, d_ff: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@register("ffn", "moe", symbol="E")
class MoE(nn.Module):
    """Top-k mixture of SwiGLU experts (Jamba layout); sets ``aux_loss`` (load balancing) on every forward."""

    def __init__(
        self,
        d_model: int,
        *,
        layer_idx: int = 0,
        d_ff: int,
        n_experts: int = 8,
        top_k: int = 2,
        aux_loss_coef: float = 0.01,
        norm_topk_prob: bool = False,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {n_experts}")
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be in [1, n_experts={n_experts}], got {top_k}")
        self.d_model, self.layer_idx, self.d_ff = d_model, layer_idx, d_ff
        self.n_experts, self.top_k = n_experts, top_k
        self.aux_loss_coef, self.norm_topk_prob = aux_loss_coef, norm_topk_prob
        self.aux_loss: Tensor | None = None
        if n_experts == 1:  # a dense SwiGLU, named like one
            self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
            self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
            self.down_proj = nn.Linear(d_ff, d_model, bias=bias)
        else:
            self.router = nn.Linear(d_model, n_experts, bias=False)
            self.experts = nn.ModuleList(Expert(d_model, d_ff, bias) for _ in range(n_experts))

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, L, d_model] (any leading shape) -> same shape. Sets ``self.aux_loss`` (None with one expert)."""
        if self.n_experts == 1:
            self.aux_loss = None
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # [T, D]
        if tokens.shape[0] == 0:
            self.aux_loss = None
            return x.clone()
        logits = self.router(tokens)  # [T, E]
        probs = logits.float().softmax(dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # [T, k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)

        flat = chosen.reshape(-1)  # [T*k], assignment a = token * k + slot
        order = flat.argsort(stable=True)  # assignments grouped by expert
        counts = torch.bincount(flat, minlength=self.n_experts)
        token_of = order // self.top_k
        routed = tokens[token_of]  # [T*k, D], expert-contiguous
        # every expert runs, an idle one on an empty chunk: its weights still join the graph (zero gradients),
        # which DDP needs to see every parameter used in every step
        outputs = [self.experts[e](chunk) for e, chunk in enumerate(routed.split(counts.tolist()))]
        expert_out = torch.cat(outputs) * weights.reshape(-1)[order].unsqueeze(-1).to(x.dtype)
        out = torch.zeros_like(tokens).index_add_(0, token_of, expert_out)

        # Switch/Jamba load balancing: E * sum_e (share of assignments to e) * (mean router probability of e)
        share = counts.float() / tokens.shape[0]
        self.aux_loss = self.aux_loss_coef * self.n_experts * (share * probs.mean(dim=0)).sum()
        return out.reshape(shape)
