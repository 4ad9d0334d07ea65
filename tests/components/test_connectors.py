"""Connectors: shapes, LLaVA's mlp2x_gelu layout and parameter names, gradients to every parameter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from components.connectors.linear import LinearConnector
from components.connectors.mlp import MLPConnector
from toolkit.registry import build


def test_linear_shapes_and_names() -> None:
    conn = LinearConnector(16, 24)
    assert conn(torch.randn(2, 5, 16)).shape == (2, 5, 24)
    assert conn(torch.randn(7, 16)).shape == (7, 24)
    assert {n: tuple(p.shape) for n, p in conn.named_parameters()} == {
        "proj.weight": (24, 16),
        "proj.bias": (24,),
    }
    assert [n for n, _ in LinearConnector(16, 24, bias=False).named_parameters()] == ["proj.weight"]


def test_mlp_depth_2_is_llava_mlp2x_gelu() -> None:
    """Same layout and names as LLaVA's mm_projector: Sequential(Linear(in, out), GELU(), Linear(out, out))."""
    torch.manual_seed(0)
    conn = MLPConnector(16, 24)
    shapes = {n: tuple(p.shape) for n, p in conn.named_parameters()}
    assert shapes == {
        "proj.0.weight": (24, 16),
        "proj.0.bias": (24,),
        "proj.2.weight": (24, 24),
        "proj.2.bias": (24,),
    }
    llava = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 24))
    llava.load_state_dict({k.removeprefix("proj."): v for k, v in conn.state_dict().items()}, strict=True)
    x = torch.randn(3, 4, 16)
    torch.testing.assert_close(conn(x), llava(x))
    assert not torch.allclose(conn(x), conn.proj[2](conn.proj[0](x)))  # the GELU is really there


@pytest.mark.parametrize(("depth", "hidden_dim"), [(1, None), (2, None), (3, None), (3, 40)])
def test_mlp_depth_and_hidden_dim(depth: int, hidden_dim: int | None) -> None:
    conn = MLPConnector(16, 24, depth=depth, hidden_dim=hidden_dim)
    linears = [m for m in conn.proj if isinstance(m, nn.Linear)]
    assert len(linears) == depth and len(conn.proj) == 2 * depth - 1
    hidden = hidden_dim or 24
    assert [(m.in_features, m.out_features) for m in linears] == [
        (16 if i == 0 else hidden, 24 if i == depth - 1 else hidden) for i in range(depth)
    ]
    assert conn(torch.randn(2, 3, 16)).shape == (2, 3, 24)


@pytest.mark.parametrize(
    "conn",
    [LinearConnector(8, 12), MLPConnector(8, 12), MLPConnector(8, 12, depth=3, act="silu", hidden_dim=20)],
    ids=["linear", "mlp2x_gelu", "mlp3x_silu"],
)
def test_every_parameter_gets_a_gradient(conn: nn.Module) -> None:
    torch.manual_seed(0)
    conn(torch.randn(2, 6, 8)).square().mean().backward()
    for name, p in conn.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="allowed: gelu"):
        MLPConnector(8, 12, act="swish")
    with pytest.raises(ValueError, match="depth must be >= 1"):
        MLPConnector(8, 12, depth=0)


def test_mlp_without_bias() -> None:
    conn = MLPConnector(8, 12, depth=3, bias=False)
    assert [n for n, _ in conn.named_parameters()] == ["proj.0.weight", "proj.2.weight", "proj.4.weight"]


def test_built_from_config_nodes_with_derived_widths() -> None:
    conn = build("connector", {"name": "mlp", "depth": 2}, "model.connector", in_dim=32, out_dim=64)
    assert isinstance(conn, MLPConnector) and conn(torch.randn(1, 32)).shape == (1, 64)
    conn = build("connector", "linear", "model.connector", in_dim=32, out_dim=64)
    assert isinstance(conn, LinearConnector)
