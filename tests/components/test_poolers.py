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


# --- modes x grids against hand-computed references -------------------------------------------------------


def windows(size: int, out: int, stride: int | None) -> list[tuple[int, int]]:
    """Pooling windows [start, end) along one axis: stride windows in ceil mode (the last one cut at the
    edge), or PyTorch's adaptive windows [floor(i * size / out), ceil((i + 1) * size / out))."""
    if stride is not None:
        return [(i * stride, min((i + 1) * stride, size)) for i in range(out)]
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def bilinear_source(size: int, out: int) -> list[float]:
    """Sampling position of each output row for align_corners=False: (i + 0.5) * size / out - 0.5, >= 0."""
    return [max((i + 0.5) * size / out - 0.5, 0.0) for i in range(out)]


def reference(x: torch.Tensor, grid, out_grid, mode: str, stride: int | None) -> torch.Tensor:
    """Pooling computed token by token with Python loops: [N, gh*gw, C] -> [N, oh*ow, C]."""
    (gh, gw), (oh, ow) = grid, out_grid
    g = x.view(x.shape[0], gh, gw, x.shape[-1])
    rows = []
    if mode == "bilinear":
        for sr in bilinear_source(gh, oh):
            r0 = int(sr)
            r1, lr = min(r0 + 1, gh - 1), sr - r0
            for sc in bilinear_source(gw, ow):
                c0 = int(sc)
                c1, lc = min(c0 + 1, gw - 1), sc - c0
                top = (1 - lc) * g[:, r0, c0] + lc * g[:, r0, c1]
                bottom = (1 - lc) * g[:, r1, c0] + lc * g[:, r1, c1]
                rows.append((1 - lr) * top + lr * bottom)
        return torch.stack(rows, 1)
    for r0, r1 in windows(gh, oh, stride):
        for c0, c1 in windows(gw, ow, stride):
            block = g[:, r0:r1, c0:c1].flatten(1, 2)
            rows.append(block.mean(1) if mode == "avg" else block.amax(1))
    return torch.stack(rows, 1)


GRIDS = {"square": (4, 4), "odd": (5, 5), "siglip": (27, 27), "wide": (3, 5), "tall": (7, 4)}


@pytest.mark.parametrize("mode", ["avg", "max", "bilinear"])
@pytest.mark.parametrize("grid", list(GRIDS.values()), ids=list(GRIDS))
@pytest.mark.parametrize("how", ["stride2", "stride3", "target_grid", "target_1"])
def test_pool2d_every_mode_matches_loop_reference(mode: str, grid, how: str) -> None:
    gh, gw = grid
    if how == "stride3" and min(grid) < 3:
        pytest.skip("window larger than the grid")
    torch.manual_seed(0)
    x = torch.randn(2, gh * gw, 3, dtype=torch.float64)
    if how.startswith("stride"):
        stride = int(how[-1])
        pool = Pool2d(grid=grid, n_tokens=gh * gw, stride=stride, mode=mode)
        out_grid = (-(-gh // stride), -(-gw // stride))
    else:
        stride = None
        out_grid = (max(gh // 2, 1), max(gw - 2, 1)) if how == "target_grid" else (1, 1)
        target = list(out_grid) if how == "target_grid" else 1
        pool = Pool2d(grid=grid, n_tokens=gh * gw, target=target, mode=mode)
    assert pool.out_grid == out_grid and pool.num_tokens == out_grid[0] * out_grid[1]
    out = pool(x)
    assert out.shape == (2, pool.num_tokens, 3)
    torch.testing.assert_close(out, reference(x, grid, out_grid, mode, stride))


def test_pool2d_odd_5x5_stride_2_by_hand() -> None:
    """Tokens t = 5 r + c: windows rows/cols [0, 2), [2, 4), [4, 5)."""
    x = grid_tokens(5, 5)
    avg = Pool2d(grid=(5, 5), n_tokens=25, stride=2)(x)[0, :, 0]
    assert avg.tolist() == [3.0, 5.0, 6.5, 13.0, 15.0, 16.5, 20.5, 22.5, 24.0]
    mx = Pool2d(grid=(5, 5), n_tokens=25, stride=2, mode="max")(x)[0, :, 0]
    assert mx.tolist() == [6.0, 8.0, 9.0, 16.0, 18.0, 19.0, 21.0, 23.0, 24.0]
    # bilinear to ceil(5 / 2) = 3: rows and cols sampled at 1/3, 2, 11/3; a linear field stays linear
    bil = Pool2d(grid=(5, 5), n_tokens=25, stride=2, mode="bilinear")(x)[0, :, 0]
    src = [1 / 3, 2.0, 11 / 3]
    torch.testing.assert_close(bil, torch.tensor([5 * r + c for r in src for c in src], dtype=torch.float64))
    assert bil[0].item() == pytest.approx(2.0) and bil[8].item() == pytest.approx(22.0)


def test_pool2d_non_square_3x5_by_hand() -> None:
    """Tokens t = 5 r + c on 3 rows x 5 cols; stride 2 -> 2 x 3."""
    x = grid_tokens(3, 5)
    avg = Pool2d(grid=(3, 5), n_tokens=15, stride=2)(x)[0, :, 0]
    assert avg.tolist() == [3.0, 5.0, 6.5, 10.5, 12.5, 14.0]
    bil = Pool2d(grid=(3, 5), n_tokens=15, stride=2, mode="bilinear")(x)[0, :, 0]
    rows, cols = [0.25, 1.75], [1 / 3, 2.0, 11 / 3]  # (i + 0.5) * 3 / 2 - 0.5 and (j + 0.5) * 5 / 3 - 0.5
    torch.testing.assert_close(
        bil, torch.tensor([5 * r + c for r in rows for c in cols], dtype=torch.float64)
    )


def test_pool2d_bilinear_stride_2_on_even_grid_equals_average() -> None:
    """Downscaling by exactly 2 samples half-way between two tokens: the 2x2 average."""
    x = grid_tokens(4, 4)
    assert Pool2d(grid=(4, 4), n_tokens=16, stride=2, mode="bilinear")(x)[0, :, 0].tolist() == [
        2.5,
        4.5,
        10.5,
        12.5,
    ]


def test_pool2d_adaptive_target_on_5x7_by_hand() -> None:
    """target [2, 3] on 5 x 7 (t = 7 r + c): rows [0, 3), [2, 5); cols [0, 3), [2, 5), [4, 7)."""
    x = grid_tokens(5, 7)
    avg = Pool2d(grid=(5, 7), n_tokens=35, target=[2, 3])(x)[0, :, 0]
    assert avg.tolist() == [8.0, 10.0, 12.0, 22.0, 24.0, 26.0]
    mx = Pool2d(grid=(5, 7), n_tokens=35, target=[2, 3], mode="max")(x)[0, :, 0]
    assert mx.tolist() == [16.0, 18.0, 20.0, 30.0, 32.0, 34.0]
    one = Pool2d(grid=(5, 7), n_tokens=35, target=1)(x)[0, :, 0]
    assert one.tolist() == [17.0]  # the mean of 0..34


def test_siglip_27x27_target_144_is_12x12_with_3_token_windows() -> None:
    """27 / 12 = 2.25: every adaptive window spans 3 tokens ([0, 3), [2, 5), [4, 7), [6, 9), [9, 12)...)."""
    pool = Pool2d(grid=(27, 27), n_tokens=729, target=144)
    assert pool.out_grid == (12, 12) and pool.num_tokens == 144
    assert windows(27, 12, None)[:5] == [(0, 3), (2, 5), (4, 7), (6, 9), (9, 12)]
    assert {e - s for s, e in windows(27, 12, None)} == {3}
    out = pool(grid_tokens(27, 27))[0, :, 0].view(12, 12)
    mid = [(s + e - 1) / 2 for s, e in windows(27, 12, None)]  # mean of a linear field = its centre
    torch.testing.assert_close(
        out, torch.tensor([[27 * r + c for c in mid] for r in mid], dtype=torch.float64)
    )
    bil = Pool2d(grid=(27, 27), n_tokens=729, target=144, mode="bilinear")
    assert bil.num_tokens == 144 and bil(torch.randn(1, 729, 2)).shape == (1, 144, 2)


def test_target_and_stride_agree_when_the_stride_divides_the_grid() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 576, 4, dtype=torch.float64)
    for mode in ("avg", "max", "bilinear"):
        by_stride = Pool2d(grid=(24, 24), n_tokens=576, stride=2, mode=mode)
        by_target = Pool2d(grid=(24, 24), n_tokens=576, target=144, mode=mode)
        torch.testing.assert_close(by_stride(x), by_target(x))
    torch.testing.assert_close(
        Pool2d(grid=(24, 24), n_tokens=576, stride=4)(x), Pool2d(grid=(24, 24), n_tokens=576, target=36)(x)
    )


@pytest.mark.parametrize(
    ("grid", "how", "tokens"),
    [
        ((24, 24), {}, 144),  # CLIP-336, default stride 2
        ((24, 24), {"stride": 2}, 144),
        ((24, 24), {"stride": 4}, 36),
        ((24, 24), {"target": 144}, 144),
        ((24, 24), {"target": 36}, 36),
        ((27, 27), {"stride": 2}, 196),  # SigLIP-384: ceil(27 / 2) = 14
        ((27, 27), {"stride": 2, "mode": "bilinear"}, 196),
        ((27, 27), {"target": 144}, 144),  # 12 x 12 exactly
        ((27, 27), {"target": 144, "mode": "bilinear"}, 144),
        ((24, 48), {"target": 72}, 72),  # 6 x 12 keeps 1:2
        ((5, 7), {"target": [2, 3]}, 6),
    ],
)
def test_tokens_per_image(grid, how, tokens) -> None:
    pool = Pool2d(grid=grid, n_tokens=grid[0] * grid[1], **how)
    assert pool.num_tokens == tokens
    assert pool(torch.randn(1, grid[0] * grid[1], 2)).shape == (1, tokens, 2)


@pytest.mark.parametrize(
    ("grid", "kwargs", "message"),
    [
        ((24, 24), {"stride": 25}, "stride 25 is larger than the 24x24 patch grid"),
        ((5, 5), {"stride": 6}, "stride 6 is larger than the 5x5 patch grid"),
        ((2, 8), {"stride": 4}, "stride 4 is larger than the 2x8 patch grid"),
        ((4, 4), {"stride": 0}, "stride must be >= 1"),
        ((24, 24), {"stride": 4, "target": 144}, "stride or target, not both"),
        ((24, 24), {"target": 150}, "target 150 tokens cannot keep the 24x24 grid's aspect ratio"),
        ((27, 27), {"target": 150}, r"counts that can: 121, 144, 169"),
        ((24, 24), {"target": 1000}, "more than the 24x24 = 576 tokens"),
        ((24, 24), {"target": 0}, "target must be >= 1"),
        ((5, 7), {"target": [6, 3]}, "target grid 6x3 does not fit in the 5x7 patch grid"),
        ((5, 7), {"target": [1, 2, 3]}, r"token count or \[rows, cols\]"),
    ],
)
def test_pool2d_degenerate_configs_are_errors(grid, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        Pool2d(grid=grid, n_tokens=grid[0] * grid[1], **kwargs)


def test_stride_equal_to_the_grid_and_target_1_are_allowed() -> None:
    x = grid_tokens(4, 4)
    assert Pool2d(grid=(4, 4), n_tokens=16, stride=4)(x)[0, :, 0].tolist() == [7.5]
    assert Pool2d(grid=(4, 4), n_tokens=16, target=1)(x)[0, :, 0].tolist() == [7.5]


def test_pool1d_target_adaptive_windows_by_hand() -> None:
    """10 tokens -> 3: windows [0, 4), [3, 7), [6, 10) (adaptive pooling overlaps by one token)."""
    avg = Pool1d(grid=None, n_tokens=10, target=3)
    assert avg.num_tokens == 3 and avg.out_grid is None
    assert avg(grid_tokens(1, 10))[0, :, 0].tolist() == [1.5, 4.5, 7.5]
    mx = Pool1d(grid=None, n_tokens=10, target=3, mode="max")
    assert mx(grid_tokens(1, 10))[0, :, 0].tolist() == [3.0, 6.0, 9.0]
    assert Pool1d(grid=None, n_tokens=10, target=1)(grid_tokens(1, 10))[0, :, 0].tolist() == [4.5]


def test_pool1d_target_144_on_576_is_stride_4() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 576, 3, dtype=torch.float64)
    by_target = Pool1d(grid=(24, 24), n_tokens=576, target=144)
    assert by_target.out_grid == (24, 6) and by_target.num_tokens == 144
    torch.testing.assert_close(by_target(x), Pool1d(grid=(24, 24), n_tokens=576, stride=4)(x))
    assert Pool1d(grid=(27, 27), n_tokens=729, target=144).out_grid is None  # 729 / 144 is not whole


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stride": 11}, "stride 11 is larger than the 10 tokens per image"),
        ({"stride": 0}, "stride must be >= 1"),
        ({"target": 11}, r"target must be 1\.\.10"),
        ({"target": 0}, r"target must be 1\.\.10"),
        ({"stride": 2, "target": 5}, "stride or target, not both"),
        ({"stride": 5, "target": 2}, "stride or target, not both"),
    ],
)
def test_pool1d_degenerate_configs_are_errors(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        Pool1d(grid=None, n_tokens=10, **kwargs)


def test_targets_from_config_nodes_and_errors_through_the_registry() -> None:
    pool = build(
        "pooler",
        {"name": "pool2d", "target": 144, "mode": "bilinear"},
        "model.pooler",
        grid=(27, 27),
        n_tokens=729,
    )
    assert pool.num_tokens == 144 and pool.out_grid == (12, 12)
    pool = build("pooler", {"name": "pool2d", "target": [2, 3]}, "model.pooler", grid=(5, 7), n_tokens=35)
    assert pool.out_grid == (2, 3)
    pool = build("pooler", {"name": "pool1d", "target": 36}, "model.pooler", grid=(24, 24), n_tokens=576)
    assert pool.num_tokens == 36
    with pytest.raises(ChimeraError, match="model.pooler.*stride 32 is larger than the 24x24 patch grid"):
        build("pooler", {"name": "pool2d", "stride": 32}, "model.pooler", grid=(24, 24), n_tokens=576)
    with pytest.raises(ChimeraError, match="model.pooler.target: expected"):
        build("pooler", {"name": "pool2d", "target": "144"}, "model.pooler", grid=(24, 24), n_tokens=576)


def test_pool1d_linear_is_longllavas_1d_resampling() -> None:
    """F.interpolate(mode='linear', align_corners=False): output i samples (i + 0.5) * L / L' - 0.5."""
    x = grid_tokens(1, 10)  # token t holds t: a linear field, so each output is its sampling position
    lin = Pool1d(grid=None, n_tokens=10, target=3, mode="linear")
    torch.testing.assert_close(lin(x)[0, :, 0], torch.tensor([7 / 6, 4.5, 47 / 6], dtype=torch.float64))
    by_stride = Pool1d(grid=None, n_tokens=10, stride=4, mode="linear")  # ceil(10 / 4) = 3: same size
    torch.testing.assert_close(by_stride(x), lin(x))
    # 576 -> 144 (LongLLaVA): downscaling by 4 blends tokens 4i + 1 and 4i + 2 only
    torch.manual_seed(0)
    y = torch.randn(2, 576, 3, dtype=torch.float64)
    out = Pool1d(grid=(24, 24), n_tokens=576, target=144, mode="linear")(y)
    torch.testing.assert_close(out, (y[:, 1::4] + y[:, 2::4]) / 2)
    assert not torch.allclose(out, Pool1d(grid=(24, 24), n_tokens=576, target=144)(y))


def test_pool2d_bilinear_target_144_is_longllavas_2d_resampling() -> None:
    """LongLLaVA: F.interpolate(size=(12, 12), mode='bilinear') on 24 x 24 = the 2 x 2 average."""
    torch.manual_seed(0)
    y = torch.randn(2, 576, 3, dtype=torch.float64)
    out = Pool2d(grid=(24, 24), n_tokens=576, target=144, mode="bilinear")(y)
    g = y.view(2, 24, 24, 3)
    expected = (g[:, 0::2, 0::2] + g[:, 0::2, 1::2] + g[:, 1::2, 0::2] + g[:, 1::2, 1::2]) / 4
    torch.testing.assert_close(out, expected.reshape(2, 144, 3))
