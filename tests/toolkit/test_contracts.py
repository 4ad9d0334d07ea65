"""Part contracts: every kind's Protocol is checked when a part is built; a plugin missing a member fails
at build, naming the plugin, the member and the contract."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from toolkit import contracts, registry
from toolkit.errors import ChimeraError


class _Part(nn.Module):
    def __init__(self, **derived):  # takes whatever the toolkit derives (widths, grids)
        super().__init__()


class _Forward(_Part):
    def forward(self, x, *args):
        return x


# For each kind: a plugin that has everything but one required member, and the member it lacks.
def _encoder():
    class NoGrid(_Forward):
        embed_dim, num_tokens, image_size = 8, 4, 16

    return NoGrid, "grid"


def _pooler():
    class NoTokens(_Forward):
        pass

    return NoTokens, "num_tokens"


def _connector():
    class NoForward(_Part):
        pass

    return NoForward, "forward"


def _decoder():
    class NoCache(_Forward):
        d_model, vocab_size = 8, 16

        def embed(self, ids):
            return ids

        def logits(self, h):
            return h

    return NoCache, "allocate_cache"


def _mixer():
    class NoCache(_Forward):
        pass

    return NoCache, "allocate_cache"


def _ffn():
    class NoForward(_Part):
        pass

    return NoForward, "forward"


def _dataset():
    class NoLen:
        def __init__(self, image_size: int = 16):
            pass

        def __getitem__(self, i):
            return {}

    return NoLen, "__len__"


def _template():
    class NoEncode:
        name, markup = "no_encode", ()

        def words(self):
            return []

    return NoEncode, "encode"


CASES = {
    "encoder": _encoder,
    "pooler": _pooler,
    "connector": _connector,
    "decoder": _decoder,
    "mixer": _mixer,
    "ffn": _ffn,
    "dataset": _dataset,
    "template": _template,
}


def test_every_kind_has_a_contract_and_a_case_here():
    assert set(contracts.CONTRACTS) == set(CASES)
    assert set(contracts.CONTRACTS) <= set(registry.KINDS)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_a_plugin_missing_a_member_fails_at_build_naming_it(kind):
    cls, missing = CASES[kind]()
    name = f"broken_{kind}"
    registry.register(kind, name)(cls)
    try:
        derived = {k: 8 for k in contracts_derived(kind)}
        with pytest.raises(ChimeraError) as info:
            registry.build(kind, {"name": name}, f"test.{kind}", **derived)
        text = str(info.value)
        assert name in text and missing in text and contracts.CONTRACTS[kind].__name__ in text
        assert cls.__qualname__ in text
    finally:
        registry._REGISTRY[kind].pop(name)


def contracts_derived(kind: str) -> tuple[str, ...]:
    return registry.DERIVED[kind]


def test_contract_check_passes_a_complete_part():
    class Complete(_Forward):
        num_tokens = 4

    contracts.check("pooler", Complete(), "complete")  # no error
    with pytest.raises(ChimeraError, match="Pooler contract: missing num_tokens"):
        contracts.check("pooler", _Forward(), "bare")
    assert torch.equal(Complete()(torch.ones(2)), torch.ones(2))
