"""Registry: registration, lookups, signature validation, errors, entry points and plugin modules."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from toolkit import registry
from toolkit.errors import ChimeraError


def test_builtins_are_discovered_through_entry_points():
    eps = {ep.name for ep in registry.entry_points(group=registry.ENTRY_POINT_GROUP)}
    assert {"encoders", "poolers", "connectors", "mixers", "ffn", "decoders"} <= eps
    assert {"identity", "pool1d", "pool2d"} <= set(registry.names("pooler"))
    assert {"attention", "mamba", "mamba2"} <= set(registry.names("mixer"))
    assert {"mlp", "moe"} <= set(registry.names("ffn"))
    assert registry.names("connector") == ["c_abstractor", "linear", "mlp"]
    assert "hybrid" in registry.names("decoder") and "timm_vit" in registry.names("encoder")
    assert "synthetic_shapes" in registry.names("dataset")


def test_build_checks_keys_before_building():
    built = []

    @registry.register("connector", "_probe_connector")
    class Probe:
        def __init__(self, in_dim: int, out_dim: int, depth: int = 2):
            built.append(depth)

        def forward(self, x):
            return x

    try:
        with pytest.raises(
            ChimeraError, match=r"model.connector.deph: unknown argument .*did you mean 'depth'"
        ):
            registry.build(
                "connector", {"name": "_probe_connector", "deph": 3}, "model.connector", in_dim=1, out_dim=2
            )
        assert built == []  # nothing was constructed
        registry.build(
            "connector", {"name": "_probe_connector", "depth": 3}, "model.connector", in_dim=1, out_dim=2
        )
        assert built == [3]
        with pytest.raises(ChimeraError, match="in_dim: is derived"):
            registry.build(
                "connector", {"name": "_probe_connector", "in_dim": 3}, "model.connector", in_dim=1, out_dim=2
            )
    finally:
        registry._REGISTRY["connector"].pop("_probe_connector")


def test_unknown_name_lists_registered_and_suggests():
    with pytest.raises(ChimeraError) as info:
        registry.build("pooler", {"name": "pool2", "stride": 2}, "model.pooler", grid=(4, 4), n_tokens=16)
    msg = str(info.value)
    assert "unknown pooler 'pool2'" in msg and "did you mean" in msg and "identity, pool1d, pool2d" in msg


def test_duplicate_registration_fails():
    @registry.register("pooler", "_dup")
    class A:  # noqa: B903
        pass

    try:
        with pytest.raises(ChimeraError, match="registered twice"):

            @registry.register("pooler", "_dup")
            class B:
                pass
    finally:
        registry._REGISTRY["pooler"].pop("_dup")


def test_pattern_symbols_are_unique():
    with pytest.raises(ChimeraError, match="symbol '\\*' .* already taken by mixer 'attention'"):

        @registry.register("mixer", "_other_attention", symbol="*")
        class Other:
            pass


def test_missing_name_and_unknown_kind():
    with pytest.raises(ChimeraError, match="missing 'name:'"):
        registry.validate("pooler", {"stride": 2}, "model.pooler")
    with pytest.raises(ChimeraError, match="unknown component kind 'poolr'.*did you mean 'pooler'"):
        registry.names("poolr")


def test_plugin_module_from_yaml_list(tmp_path, monkeypatch):
    (tmp_path / "my_plugin_mod.py").write_text(
        textwrap.dedent(
            """
            from torch import nn
            from toolkit.registry import register

            @register("connector", "_yaml_plugin_connector")
            class Tiny(nn.Linear):
                def __init__(self, in_dim: int, out_dim: int):
                    super().__init__(in_dim, out_dim)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        registry.import_plugins(["my_plugin_mod"])
        layer = registry.build("connector", {"name": "_yaml_plugin_connector"}, in_dim=3, out_dim=5)
        assert layer.weight.shape == (5, 3)
        with pytest.raises(ChimeraError, match="cannot import plugin module 'no_such_mod'"):
            registry.import_plugins(["no_such_mod"])
    finally:
        registry._REGISTRY["connector"].pop("_yaml_plugin_connector", None)


def test_third_party_package_via_entry_point(tmp_path, tiny_experiment):
    """A separately *installed* package (a dist-info with entry_points.txt on sys.path) adds a pooler that a
    YAML file uses with no change to Chimera; checked in a fresh interpreter, end to end through describe."""
    pkg = tmp_path / "site"
    (pkg / "acme_pool").mkdir(parents=True)
    (pkg / "acme_pool" / "__init__.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn
            from toolkit.registry import register

            @register("pooler", "acme_max")
            class AcmeMax(nn.Module):
                '''Keeps every k-th token (a third-party pooler).'''
                def __init__(self, *, grid=None, n_tokens: int, every: int = 2):
                    super().__init__()
                    self.every = every
                    self.num_tokens = (n_tokens + every - 1) // every
                def forward(self, x):
                    return x[:, :: self.every]
            """
        )
    )
    dist = pkg / "acme_pool-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-pool\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[chimera.components]\nacme = acme_pool\n")
    script = textwrap.dedent(
        f"""
        import sys, json
        sys.path.insert(0, {str(pkg)!r})
        from toolkit.describe import describe
        info = describe({str(tiny_experiment)!r}, ["model.pooler.name=acme_max", "model.pooler.every=4"])
        print(json.dumps(info["image_tokens"]))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "4"  # 16 patch tokens, every 4th kept


def test_a_renamed_component_still_resolves_under_its_old_name_with_a_warning():
    @registry.register("connector", "_renamed_connector", aliases=("_old_connector_name",))
    class Renamed:
        def __init__(self, in_dim: int, out_dim: int):
            pass

        def forward(self, x):
            return x

    try:
        with pytest.warns(UserWarning, match="'_old_connector_name' was renamed to '_renamed_connector'"):
            entry = registry.get("connector", "_old_connector_name")
        assert entry.target is Renamed
    finally:
        registry._REGISTRY["connector"].pop("_renamed_connector")
        registry._ALIASES["connector"].pop("_old_connector_name")
