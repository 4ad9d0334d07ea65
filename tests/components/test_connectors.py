"""Connectors: shapes, LLaVA's mlp2x_gelu layout and parameter names, gradients to every parameter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from components.connectors.c_abstractor import CAbstractor
from components.connectors.linear import LinearConnector
from components.connectors.mlp import MLPConnector
from toolkit.errors import ChimeraError
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


# --- C-Abstractor (Honeybee, arXiv 2312.06742) --------------------------------------------------------------


def bottleneck_params(c_in: int, c: int) -> int:
    """One RegNet bottleneck of the C-Abstractor, by hand (timm RegStage defaults: bottle_ratio 1, group
    size 1, SE ratio 0.25 of the block's input width, LayerNorm2d with weight and bias, bias-free convs)."""
    r = round(c_in / 4)
    conv1 = c_in * c + 2 * c  # 1x1 conv + LN
    conv2 = 9 * c + 2 * c  # 3x3 depthwise conv + LN
    se = (c * r + r) + (r * c + c)  # squeeze-excite: two 1x1 convs with bias
    conv3 = c * c + 2 * c  # 1x1 conv + LN
    shortcut = c_in * c + 2 * c if c_in != c else 0  # 1x1 projection + LN when the width changes
    return conv1 + conv2 + se + conv3 + shortcut


def c_abstractor_params(C: int, H: int, D: int, L: int, mlp_depth: int, P: int, pos_emb=True, prenorm=False):
    """The paper's C-Abstractor: pos_emb + L blocks (C->H) + adaptive pool + L blocks (H->H) + MLP (H->D)."""
    stages = bottleneck_params(C, H) + (L - 1) * bottleneck_params(H, H) + L * bottleneck_params(H, H)
    if L == 0:
        stages, H = 0, C
    readout = H * D + D + (mlp_depth - 1) * (D * D + D)
    return P * C * pos_emb + 2 * C * prenorm + stages + readout


def test_c_abstractor_shapes_tokens_and_honeybee_names() -> None:
    conn = CAbstractor(24, 40, grid=(6, 6), num_queries=9, hidden_dim=32, depth=2)
    assert conn.num_tokens == 9 and conn.out_grid == (3, 3)
    assert conn(torch.randn(2, 36, 24)).shape == (2, 9, 40)
    names = {n for n, _ in conn.named_parameters()}
    # Honeybee's abstractor.* keys with the prefix removed
    for key in (
        "pos_emb",
        "net.0.b1.conv1.conv.weight",
        "net.0.b1.conv1.bn.weight",
        "net.0.b1.conv2.conv.weight",
        "net.0.b1.se.fc1.weight",
        "net.0.b1.conv3.conv.weight",
        "net.0.b1.downsample.conv.weight",
        "net.0.b2.conv1.conv.weight",
        "net.2.b2.conv3.bn.bias",
        "readout.0.weight",
        "readout.2.bias",
    ):
        assert key in names, key
    assert isinstance(conn.net[1], nn.AdaptiveAvgPool2d) and isinstance(conn.readout[1], nn.SiLU)
    assert conn.net[0].b1.conv2.conv.groups == 32  # depthwise 3x3


@pytest.mark.parametrize(
    ("C", "H", "D", "L", "mlp_depth", "grid", "queries", "pos_emb", "prenorm"),
    [
        (24, 32, 40, 2, 2, (6, 6), 9, True, False),  # width change: shortcut projection in the first block
        (32, 32, 16, 3, 2, (5, 5), 4, True, True),  # odd grid, prenorm
        (16, 16, 8, 1, 3, (4, 6), 6, False, False),  # non-square grid: 4x6 -> 2x3
        (16, 16, 8, 0, 2, (4, 4), 4, True, False),  # depth 0: pooling + MLP only
    ],
)
def test_c_abstractor_parameter_count_matches_the_formula(
    C, H, D, L, mlp_depth, grid, queries, pos_emb, prenorm
) -> None:
    conn = CAbstractor(
        C,
        D,
        grid=grid,
        num_queries=queries,
        hidden_dim=H,
        depth=L,
        mlp_depth=mlp_depth,
        pos_emb=pos_emb,
        prenorm=prenorm,
    )
    n = sum(p.numel() for p in conn.parameters())
    assert n == c_abstractor_params(C, H, D, L, mlp_depth, grid[0] * grid[1], pos_emb, prenorm)


def test_c_abstractor_honeybee_7b_size_on_meta() -> None:
    """Honeybee's c-abs.yaml on CLIP ViT-L/14-336 (576 tokens, width 1024) into a 4096-wide LLM:
    pos_emb 576 * 1024 = 589,824; blocks 6 * B(1024, 1024) = 6 * 2,638,080 = 15,828,480 (two 1x1 convs,
    a depthwise 3x3, SE 1024 -> 256 -> 1024 with biases, three LNs); MLP 1024 * 4096 + 4096 + 4096^2 + 4096
    = 20,979,712; total 37,398,016."""
    two_1x1, depthwise, se, norms = 2 * 1024 * 1024, 9 * 1024, 2 * 1024 * 256 + 256 + 1024, 3 * 2 * 1024
    assert bottleneck_params(1024, 1024) == two_1x1 + depthwise + se + norms == 2_638_080
    with torch.device("meta"):
        conn = CAbstractor(1024, 4096, grid=(24, 24))
    n = sum(p.numel() for p in conn.parameters())
    assert conn.num_tokens == 144 and conn.out_grid == (12, 12) and conn.hidden_dim == 1024
    assert n == c_abstractor_params(1024, 1024, 4096, 3, 2, 576) == 37_398_016
    with torch.device("meta"):  # SigLIP-so400m-384: 27x27 width 1152 -> 144 queries (12 x 12)
        siglip = CAbstractor(1152, 4096, grid=(27, 27), hidden_dim=1024)
    assert siglip.out_grid == (12, 12)
    assert sum(p.numel() for p in siglip.parameters()) == c_abstractor_params(1152, 1024, 4096, 3, 2, 729)


def test_c_abstractor_without_blocks_is_adaptive_pooling_then_mlp() -> None:
    """With depth 0 and no positional embedding it is adaptive average pooling followed by the MLP."""
    torch.manual_seed(0)
    conn = CAbstractor(8, 12, grid=(5, 5), num_queries=4, depth=0, pos_emb=False)
    x = torch.randn(2, 25, 8)
    pooled = torch.nn.functional.adaptive_avg_pool2d(x.transpose(1, 2).reshape(2, 8, 5, 5), (2, 2))
    torch.testing.assert_close(conn(x), conn.readout(pooled.flatten(2).transpose(1, 2)))


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_c_abstractor_every_parameter_gets_a_gradient(depth: int) -> None:
    torch.manual_seed(0)
    conn = CAbstractor(8, 12, grid=(5, 7), num_queries=[2, 3], hidden_dim=16, depth=depth, prenorm=True)
    conn(torch.randn(2, 35, 8)).square().mean().backward()
    for name, p in conn.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_c_abstractor_errors() -> None:
    with pytest.raises(ChimeraError, match="needs the patch grid"):
        CAbstractor(8, 12, grid=None)
    with pytest.raises(ValueError, match="num_queries target 10 tokens cannot keep the 6x6 grid"):
        CAbstractor(8, 12, grid=(6, 6), num_queries=10)
    with pytest.raises(ValueError, match="more than the 6x6 = 36 tokens"):
        CAbstractor(8, 12, grid=(6, 6), num_queries=49)
    with pytest.raises(ValueError, match="expects 36 tokens"):
        CAbstractor(8, 12, grid=(6, 6), num_queries=4)(torch.randn(1, 35, 8))


def test_c_abstractor_built_from_config_with_derived_grid() -> None:
    conn = build(
        "connector",
        {"name": "c_abstractor", "num_queries": 144, "depth": 1},
        "model.connector",
        in_dim=32,
        out_dim=64,
        grid=(27, 27),
    )
    assert isinstance(conn, CAbstractor) and conn.num_tokens == 144
    assert conn(torch.randn(1, 729, 32)).shape == (1, 144, 64)
    # derived grid accepted by linear/mlp too (ignored), so the toolkit can pass it to every connector
    assert isinstance(
        build("connector", "mlp", "model.connector", in_dim=32, out_dim=64, grid=(2, 2)), MLPConnector
    )
    with pytest.raises(ChimeraError, match="model.connector.grid: is derived by Chimera"):
        build(
            "connector",
            {"name": "c_abstractor", "grid": [2, 2]},
            "model.connector",
            in_dim=8,
            out_dim=8,
            grid=(2, 2),
        )
