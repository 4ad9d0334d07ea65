"""Top-k MoE: routing matches a per-token reference and transformers' Jamba block, the load-balancing loss,
gradients reach the experts that got tokens, one expert is exactly a dense SwiGLU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from components.ffn.mlp import SwiGLU
from components.ffn.moe import MoE
from toolkit.registry import build, get

D_MODEL, D_FF = 16, 24


def reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: softmax router, top-k, weighted sum of the chosen experts' SwiGLU outputs."""
    out = []
    for token in x.reshape(-1, x.shape[-1]):
        probs = F.softmax(moe.router(token), dim=-1)
        weights, chosen = probs.topk(moe.top_k)
        if moe.norm_topk_prob:
            weights = weights / weights.sum()
        out.append(sum(w * moe.experts[int(e)](token) for w, e in zip(weights, chosen)))
    return torch.stack(out).reshape(x.shape)


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_output_matches_per_token_reference(norm_topk_prob):
    moe = MoE(D_MODEL, d_ff=D_FF, n_experts=4, top_k=2, norm_topk_prob=norm_topk_prob)
    x = torch.randn(2, 7, D_MODEL)
    out = moe(x)
    assert out.shape == x.shape
    assert (out - reference(moe, x)).abs().max() <= 1e-5


def test_matches_transformers_jamba_sparse_moe_block():
    from transformers import JambaConfig
    from transformers.models.jamba.modeling_jamba import JambaSparseMoeBlock

    moe = MoE(D_MODEL, d_ff=D_FF, n_experts=4, top_k=2)
    config = JambaConfig(hidden_size=D_MODEL, intermediate_size=D_FF, num_experts=4, num_experts_per_tok=2)
    theirs = JambaSparseMoeBlock(config)
    with torch.no_grad():  # transformers 5 stores the experts fused: gate_up_proj[e] = [gate; up]
        theirs.router.weight.copy_(moe.router.weight)
        for e, expert in enumerate(moe.experts):
            theirs.experts.gate_up_proj[e].copy_(torch.cat([expert.gate_proj.weight, expert.up_proj.weight]))
            theirs.experts.down_proj[e].copy_(expert.down_proj.weight)
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in moe.parameters())
    x = torch.randn(2, 9, D_MODEL)
    with torch.no_grad():
        assert (moe(x) - theirs(x)).abs().max() <= 1e-5


def test_aux_loss_is_switch_load_balancing_times_coefficient():
    moe = MoE(D_MODEL, d_ff=D_FF, n_experts=4, top_k=2, aux_loss_coef=0.5)
    x = torch.randn(3, 5, D_MODEL)
    moe.train()
    moe(x)
    assert moe.aux_loss is not None and moe.aux_loss.dim() == 0 and moe.aux_loss > 0
    # E * sum_e f_e P_e, f_e = share of the top-k assignments (sums to k), P_e = mean router probability
    probs = F.softmax(moe.router(x.reshape(-1, D_MODEL)), dim=-1)
    counts = torch.bincount(probs.topk(2).indices.reshape(-1), minlength=4).float()
    expected = 0.5 * 4 * (counts / 15 * probs.mean(0)).sum()
    assert torch.allclose(moe.aux_loss, expected)
    # it is differentiable with respect to the router (that is what balances the load)
    moe.aux_loss.backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    # every forward replaces it
    first = moe.aux_loss
    moe(torch.randn(1, 4, D_MODEL))
    assert moe.aux_loss is not first


def test_gradient_reaches_every_expert_that_got_tokens_and_only_those():
    torch.manual_seed(0)
    moe = MoE(D_MODEL, d_ff=D_FF, n_experts=8, top_k=1)
    with torch.no_grad():  # route everything to experts 0..3 by making the router ignore 4..7
        moe.router.weight[4:] = 0.0
        moe.router.weight[4:, 0] = -100.0
    x = torch.randn(4, 16, D_MODEL)
    x[..., 0] = x[..., 0].abs() + 0.1  # so the -100 weight always loses
    chosen = moe.router(x.reshape(-1, D_MODEL)).argmax(-1).unique().tolist()
    moe(x).sum().backward()
    for e, expert in enumerate(moe.experts):
        got = [p.grad is not None and p.grad.abs().sum() > 0 for p in expert.parameters()]
        assert all(got) if e in chosen else not any(got), e
    assert set(chosen) <= {0, 1, 2, 3} and len(chosen) >= 2


def test_dispatch_runs_each_expert_only_on_its_tokens(monkeypatch):
    moe = MoE(D_MODEL, d_ff=D_FF, n_experts=4, top_k=2)
    x = torch.randn(2, 6, D_MODEL)
    seen = []
    for expert in moe.experts:
        expert.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    moe(x)
    assert sum(seen) == 2 * 6 * 2  # tokens * top_k rows in total, no dense compute


def test_one_expert_is_a_dense_swiglu_with_its_names():
    moe = MoE(D_MODEL, d_ff=D_FF, n_experts=1, top_k=1)
    assert set(moe.state_dict()) == {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}
    dense = SwiGLU(D_MODEL, d_ff=D_FF)
    dense.load_state_dict(moe.state_dict())
    x = torch.randn(2, 5, D_MODEL)
    assert torch.equal(moe(x), dense(x))
    assert moe.aux_loss is None

    from transformers import JambaConfig
    from transformers.models.jamba.modeling_jamba import JambaMLP

    jamba = JambaMLP(JambaConfig(hidden_size=D_MODEL, intermediate_size=D_FF, num_experts=1))
    jamba.load_state_dict(moe.state_dict())
    with torch.no_grad():
        assert (jamba(x) - moe(x)).abs().max() <= 1e-6


def test_registered_and_validated():
    entry = get("ffn", "moe")
    assert entry.target is MoE and entry.symbol == "E"
    moe = build("ffn", {"name": "moe", "d_ff": D_FF, "n_experts": 4}, d_model=D_MODEL, layer_idx=1)
    assert moe.layer_idx == 1 and len(moe.experts) == 4
    with pytest.raises(ValueError, match="top_k"):
        MoE(D_MODEL, d_ff=D_FF, n_experts=2, top_k=3)
