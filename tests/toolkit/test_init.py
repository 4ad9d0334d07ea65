"""Meta-device build and the memory policy, in one process (the 2-process FSDP2 runs are in tests/distributed).

- ``toolkit.init.materialize``: every tensor of a meta-built model is allocated and initialised as its
  constructors would (deterministic ones exactly, random ones from the same distributions), parts built for
  real keep their values, and a module with no initialisation is named instead of training on garbage;
- ``toolkit.init.load_sharded`` without a process group (plain tensors);
- activation checkpointing by layer kind, the frozen-part dtype, the memory-policy checks;
- ``train`` with ``strategy.init: meta`` on one process (materialised whole, then trained).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from tests.conftest import TINY_MODEL
from toolkit.errors import ChimeraError
from toolkit.init import has_meta, init_weights, load_sharded, materialize
from toolkit.model import build_model
from toolkit.strategies import (
    apply_activation_checkpointing,
    check_memory_policy,
    keep_frozen,
    shard_units,
    unit_kinds,
)

VOCAB, IMG = 100, 3
EVERY_KIND = {  # attention, Mamba (inner norms), MoE, Mamba-2, SwiGLU; a C-Abstractor; a timm ViT
    **copy.deepcopy(TINY_MODEL),
    "pooler": {"name": "identity"},
    "connector": {"name": "c_abstractor", "num_queries": 4, "depth": 1},
    "decoder": {
        "name": "hybrid",
        "d_model": 64,
        "n_layers": 4,
        "pattern": "*-mEM-*E",
        "mixers": {
            "attention": {"n_heads": 4},
            "mamba": {"d_state": 8, "inner_norms": True},
            "mamba2": {"d_state": 16, "headdim": 16},
        },
        "ffns": {"mlp": {"d_ff": 256}, "moe": {"d_ff": 128, "n_experts": 4, "top_k": 2}},
    },
}


def _eager(cfg=EVERY_KIND, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg, vocab_size=VOCAB, image_token_id=IMG)


def _meta(cfg=EVERY_KIND):
    with torch.device("meta"):
        return build_model(cfg, vocab_size=VOCAB, image_token_id=IMG)


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, VOCAB, (2, 12), generator=g)
    ids[:, 1:5] = IMG
    return ids, torch.rand(2, 3, 16, 16, generator=g)


# --------------------------------------------------------------------------------------------- materialize
def test_meta_build_is_initialised_like_the_eager_build():
    eager, other = _eager().state_dict(), _eager(seed=1).state_dict()
    model = _meta()
    assert has_meta(model)
    names = materialize(model, "cpu", seed=0)
    assert not has_meta(model) and len(names) == len(list(model.parameters())) + len(list(model.buffers()))
    state = model.state_dict()
    assert set(state) == set(eager)
    stats = 0
    for name, ref in eager.items():
        value = state[name]
        assert value.shape == ref.shape and value.dtype == ref.dtype, name
        assert torch.isfinite(value).all(), name
        if torch.equal(ref, other[name]):  # the eager init draws no random numbers: same tensor exactly
            assert torch.equal(value, ref), name
            continue
        # random: the same distribution (identical numbers only where the draws happen in the eager order,
        # e.g. the timm encoder's first tensors here)
        if ref.numel() >= 256:  # same distribution: mean and spread of the eager draw
            spread, n = float(ref.std()), ref.numel()
            assert abs(float(value.mean() - ref.mean())) < 6 * spread / math.sqrt(n), name
            assert abs(float(value.std()) / spread - 1) < 6 / math.sqrt(2 * n) + 0.02, name
            stats += 1
    assert stats > 40
    ids, images = _batch()
    assert torch.isfinite(model(ids, images)).all()


def test_exact_constants_after_a_meta_build():
    model = _meta()
    materialize(model, "cpu", seed=3)
    model.requires_grad_(False)
    mamba, mamba2 = model.decoder.layers[1].mixer, model.decoder.layers[2].mixer
    assert torch.equal(mamba.A_log, torch.log(torch.arange(1, 9.0)).expand(mamba.d_inner, -1))
    assert torch.equal(mamba.D, torch.ones_like(mamba.D)) and torch.equal(mamba2.D, torch.ones_like(mamba2.D))
    assert float(mamba2.A_log.exp().min()) >= 1.0 and float(mamba2.A_log.exp().max()) <= 16.0
    dt = torch.nn.functional.softplus(mamba.dt_proj.bias)  # log-uniform in [dt_min, dt_max]
    assert float(dt.min()) >= 1e-3 * 0.999 and float(dt.max()) <= 0.1 * 1.001
    assert abs(float(model.decoder.embed_tokens.weight.std()) - 0.02) < 0.002  # the decoder's own init wins


def test_the_seed_fixes_the_meta_init_and_the_global_rng_is_left_alone():
    a, b, c = _meta(), _meta(), _meta()
    torch.manual_seed(5)
    before = torch.get_rng_state()
    materialize(a, "cpu", seed=0)
    assert torch.equal(torch.get_rng_state(), before)
    materialize(b, "cpu", seed=0)
    materialize(c, "cpu", seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["decoder.lm_head.weight"], sc["decoder.lm_head.weight"])


def test_parts_built_for_real_keep_their_values(tiny_experiment):
    from toolkit.assemble import build_model as assemble
    from toolkit.plan import load_plan

    plan = load_plan(tiny_experiment)
    torch.manual_seed(0)
    eager = assemble(plan.cfg, plan.tokenizer)
    torch.manual_seed(0)
    model = assemble(plan.cfg, plan.tokenizer, init="meta")
    assert not has_meta(model.encoder) and has_meta(model.decoder) and has_meta(model.connector)
    for name, value in model.encoder.state_dict().items():  # built first, for real: the eager tensors
        assert torch.equal(value, eager.encoder.state_dict()[name]), name
    encoder = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    materialize(model, "cpu", seed=0)
    assert all(torch.equal(v, encoder[k]) for k, v in model.encoder.state_dict().items())
    assert set(model.state_dict()) == set(eager.state_dict())


def test_a_module_without_an_initialisation_is_named():
    class Raw(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))  # no reset_parameters: lost by to_empty
            self.proj = nn.Linear(4, 4)

    with torch.device("meta"):
        model = nn.Sequential(Raw())
    with pytest.raises(ChimeraError, match=r"not initialised .*0\.scale"):
        materialize(model, "cpu")


def test_init_weights_runs_children_first_and_prefers_init_weights():
    calls = []

    class Leaf(nn.Linear):
        def reset_parameters(self) -> None:
            calls.append("leaf")
            super().reset_parameters()

    class Parent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.leaf = Leaf(2, 2)

        def reset_parameters(self) -> None:
            calls.append("parent.reset")

        def init_weights(self) -> None:
            calls.append("parent.init_weights")
            nn.init.zeros_(self.leaf.weight)

    model = Parent()
    calls.clear()
    init_weights(model)
    assert calls == ["leaf", "parent.init_weights"]
    assert torch.equal(model.leaf.weight, torch.zeros(2, 2))


def test_a_part_half_built_on_meta_is_refused():
    class Half(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.real = nn.Linear(2, 2)
            with torch.device("meta"):
                self.scale = nn.Parameter(torch.ones(2))

        def reset_parameters(self) -> None:
            nn.init.ones_(self.scale)

    with pytest.raises(ChimeraError, match="beside materialised ones"):
        materialize(nn.Sequential(Half()), "cpu")


@pytest.mark.parametrize("suffix", ["safetensors", "ckpt"])
def test_load_sharded_without_a_process_group_loads_every_key(tmp_path, suffix):
    from toolkit.checkpointing import export_weights

    eager = _eager()
    path = export_weights(eager.state_dict(), tmp_path / f"w.{suffix}")
    model = _meta()
    materialize(model, "cpu", seed=7)
    load_sharded(model, path)
    ids, images = _batch()
    with torch.no_grad():
        assert torch.equal(model(ids, images), eager(ids, images))
    partial = {k: v for k, v in eager.state_dict().items() if not k.startswith("connector.")}
    export_weights(partial, tmp_path / f"partial.{suffix}")
    with pytest.raises(ChimeraError, match="missing keys"):
        load_sharded(model, tmp_path / f"partial.{suffix}")


# --------------------------------------------------------------------------------------------- memory policy
def test_activation_checkpointing_by_layer_kind():
    kinds = unit_kinds(_eager())
    assert sorted(sorted(k) for k in kinds.values()) == sorted(
        [["encoder"]] * 1
        + [["attention", "decoder", "mlp"], ["decoder", "mamba", "moe"], ["decoder", "mamba2", "mlp"]]
        + [["attention", "decoder", "moe"]]
    )
    for selection, wrapped in [
        (["mamba"], 1),
        (["mamba", "mamba2"], 2),
        (["attention"], 2),
        (["moe"], 2),
        (["encoder"], 1),
        (["attention", "mamba", "mamba2", "encoder"], 5),
        (True, 5),
        (False, 0),
        ([], 0),
    ]:
        model = _eager()
        assert apply_activation_checkpointing(model, selection) == wrapped, selection
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

        assert sum(isinstance(m, CheckpointWrapper) for m in model.modules()) == wrapped
        assert len(shard_units(model)) == 5  # the wrappers stand for their units
    with pytest.raises(ChimeraError, match="unknown layer kind 'mamba3'.*did you mean"):
        apply_activation_checkpointing(_eager(), ["mamba3"])


def test_a_frozen_part_is_kept_in_bf16_outside_the_gradient_path():
    cfg = copy.deepcopy(EVERY_KIND)
    cfg["encoder"]["freeze"] = True
    model = _eager(cfg)
    assert keep_frozen(model, "bf16") == ["encoder"]
    assert {p.dtype for p in model.encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for n, p in model.named_parameters() if not n.startswith("encoder.")} == {torch.float32}
    ids, images = _batch()
    feats = model.encoder(images)
    assert feats.dtype == torch.float32  # back in the dtype it was given
    loss = model(ids, images).float().logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.connector.parameters())
    assert keep_frozen(model, None) == []


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("init", "lazy", "strategy.init"),
        ("activation_checkpointing", ["attn"], "did you mean"),
        ("reshard_after_forward", "sometimes", "true, false or auto"),
        ("reshard_after_forward", 2, "true, false or auto"),
        ("frozen_dtype", "int8", "strategy.frozen_dtype"),
        ("shard_frozen", "no", "strategy.shard_frozen"),
        ("part_precision", {"llm": "bf16-mixed"}, "did you mean|not a part"),
        ("part_precision", {"decoder": "bf16-true"}, "strategy.part_precision.decoder"),
    ],
)
def test_memory_policy_values_are_checked(key, value, match):
    with pytest.raises(ChimeraError, match=match):
        check_memory_policy({key: value})


def test_memory_policy_defaults_change_nothing():
    assert check_memory_policy({}) == {
        "init": "eager",
        "activation_checkpointing": False,
        "reshard_after_forward": True,
        "frozen_dtype": None,
        "shard_frozen": True,
        "part_precision": {},
    }


def test_train_with_a_meta_init_on_one_process(tiny_experiment):
    from toolkit.train import train

    result = train(
        tiny_experiment, ["strategy.init=meta", "trainer.max_steps=2", "trainer.val_check_interval=2"]
    )
    stage = result.stages[0]
    assert stage.global_step == 2 and math.isfinite(stage.metrics["train/loss"])
