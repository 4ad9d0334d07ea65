"""Poolers: exact values on hand-made grids, token counts, odd grids, user errors."""

from __future__ import annotations

import pytest
import torch

from components.poolers.identity import IdentityPooler
from components.poolers.pool1d import Pool1d
from components.poolers.pool2d import Pool2d
from toolkit.errors import ChimeraError
from toolkit.registry import build


def grid_tokens(h: int, w: int, channels: int = 1) -> torch.Tensor:
    """[1, h*w, C] with token t (row-major) holding t + 1000 * c in channel c."""
    t = torch.arange(h * w, dtype=torch.float64)
    return torch.stack([t + 1000 * c for c in range(channels)], dim=-1).unsqueeze(0)


def test_identity_keeps_everything() -> None:
    pool = IdentityPooler(grid=(24, 24), n_tokens=576)
    x = torch.randn(2, 576, 8)
    assert pool(x) is x and pool.num_tokens == 576 and pool.out_grid == (24, 24)
    assert IdentityPooler(grid=None, n_tokens=577).out_grid is None


def test_pool2d_avg_and_max_of_a_4x4_grid() -> None:
    x = grid_tokens(4, 4, channels=2)  # rows 0 1 2 3 / 4 5 6 7 / 8 9 10 11 / 12 13 14 15
    avg = Pool2d(grid=(4, 4), n_tokens=16, stride=2)
    out = avg(x)
    assert out.shape == (1, 4, 2) and avg.num_tokens == 4 and avg.out_grid == (2, 2)
    assert out[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5]
    assert out[0, :, 1].tolist() == [1002.5, 1004.5, 1010.5, 1012.5]
    mx = Pool2d(grid=(4, 4), n_tokens=16, stride=2, mode="max")
    assert mx(x)[0, :, 0].tolist() == [5.0, 7.0, 13.0, 15.0]


def test_pool2d_non_square_grid_keeps_row_major_order() -> None:
    x = grid_tokens(2, 4)  # 0 1 2 3 / 4 5 6 7
    out = Pool2d(grid=(2, 4), n_tokens=8, stride=2)(x)
    assert out[0, :, 0].tolist() == [2.5, 4.5]


def test_pool2d_odd_27x27_grid_averages_only_real_tokens_at_the_edge() -> None:
    """SigLIP so400m: 27 x 27 -> 14 x 14; the last row/column windows hold 2 (corner: 1) real tokens."""
    torch.manual_seed(0)
    x = torch.randn(2, 27 * 27, 3, dtype=torch.float64)
    pool = Pool2d(grid=(27, 27), n_tokens=729, stride=2)
    out = pool(x)
    assert pool.out_grid == (14, 14) and pool.num_tokens == 196 and out.shape == (2, 196, 3)
    g = x.view(2, 27, 27, 3)
    o = out.view(2, 14, 14, 3)
    for j in range(13):  # last row: mean of the two real tokens of row 26
        torch.testing.assert_close(o[:, 13, j], g[:, 26, 2 * j : 2 * j + 2].mean(1))
        torch.testing.assert_close(o[:, j, 13], g[:, 2 * j : 2 * j + 2, 26].mean(1))
    torch.testing.assert_close(o[:, 13, 13], g[:, 26, 26])  # the corner window holds one token
    torch.testing.assert_close(o[:, 0, 0], g[:, 0:2, 0:2].mean((1, 2)))
    torch.testing.assert_close(o[:, 6, 12], g[:, 12:14, 24:26].mean((1, 2)))


@pytest.mark.parametrize(
    ("grid", "stride", "expected_grid"),
    [
        ((24, 24), 2, (12, 12)),
        ((24, 24), 4, (6, 6)),
        ((27, 27), 2, (14, 14)),
        ((27, 27), 3, (9, 9)),
        ((5, 7), 1, (5, 7)),
    ],
)
def test_pool2d_num_tokens_matches_output(grid, stride, expected_grid) -> None:
    pool = Pool2d(grid=grid, n_tokens=grid[0] * grid[1], stride=stride)
    out = pool(torch.randn(3, grid[0] * grid[1], 4))
    assert pool.out_grid == expected_grid
    assert out.shape == (3, pool.num_tokens, 4) and pool.num_tokens == expected_grid[0] * expected_grid[1]


def test_pool1d_stride_4_exact_values_and_partial_last_window() -> None:
    pool = Pool1d(grid=None, n_tokens=10, stride=4)
    out = pool(grid_tokens(1, 10))
    assert pool.num_tokens == 3 and out.shape == (1, 3, 1)
    assert out[0, :, 0].tolist() == [1.5, 5.5, 8.5]  # last window: (8 + 9) / 2, not (8 + 9) / 4
    mx = Pool1d(grid=None, n_tokens=10, stride=4, mode="max")
    assert mx(grid_tokens(1, 10))[0, :, 0].tolist() == [3.0, 7.0, 9.0]


def test_pool1d_longllava_576_to_144() -> None:
    pool = Pool1d(grid=(24, 24), n_tokens=576, stride=4)
    x = grid_tokens(24, 24, channels=2)
    out = pool(x)
    assert out.shape == (1, 144, 2) and pool.num_tokens == 144
    assert pool.out_grid == (24, 6)  # each window lies inside one row of the grid
    torch.testing.assert_close(out[0, 7], x[0, 28:32].mean(0))
    assert Pool1d(grid=(27, 27), n_tokens=729, stride=4).out_grid is None  # windows straddle rows


def test_pool2d_without_grid_explains_drop_prefix_tokens() -> None:
    with pytest.raises(ChimeraError, match="drop_prefix_tokens: true"):
        Pool2d(grid=None, n_tokens=577)


@pytest.mark.parametrize("cls", [Pool1d, Pool2d])
def test_bad_mode_lists_allowed_modes(cls) -> None:
    with pytest.raises(ValueError, match="allowed modes: avg, max"):
        cls(grid=(4, 4), n_tokens=16, mode="mean")


def test_built_from_config_nodes_with_derived_grid() -> None:
    pool = build("pooler", {"name": "pool2d", "stride": 2}, "model.pooler", grid=(24, 24), n_tokens=576)
    assert isinstance(pool, Pool2d) and pool.num_tokens == 144
    pool = build("pooler", {"name": "pool1d"}, "model.pooler", grid=(24, 24), n_tokens=576)
    assert isinstance(pool, Pool1d) and pool.num_tokens == 144
    assert build("pooler", "identity", "model.pooler", grid=None, n_tokens=577).num_tokens == 577
    with pytest.raises(ChimeraError, match="model.pooler.*allowed modes"):
        build("pooler", {"name": "pool2d", "mode": "sum"}, "model.pooler", grid=(4, 4), n_tokens=16)
