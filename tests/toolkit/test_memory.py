"""toolkit/memory.py: the memory plan against what autograd really saves (exactly, with saved-tensor hooks), what
a CPU training step really takes (peak resident memory of a fresh process), and the reference model on a host
that cannot hold it (the error comes back at once, with the numbers, without allocating)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import ROOT
from toolkit import memory
from toolkit.config import DEFAULTS
from toolkit.errors import ChimeraError
from toolkit.registry import build

REFERENCE = ROOT / "experiments" / "longllava" / "reference.yaml"
B, L, D = 2, 256, 64


def settings(**changes) -> memory.Settings:
    base = dict(
        accelerator="cpu",
        devices=1,
        processes_per_node=1,
        strategy="single",
        precision="32-true",
        checkpointing=False,
        reshard_after_forward=True,
        seq_len=L,
        batch_size=B,
        images=0,
        inference_batch=1,
        inference_weight_bytes=None,
    )
    return memory.Settings(**{**base, **changes})


def saved_per_token(fn, module, tokens: int) -> float:
    """Bytes autograd keeps for backward while ``fn`` runs, per token: every saved tensor's storage once,
    parameters excluded (they are counted as parameters)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values()) / tokens


# --------------------------------------------------------------------------------------------- per layer kind
SUBLAYERS = [
    ("mixer", "attention", {"n_heads": 4, "n_kv_heads": 2, "pos_emb": "none"}),
    ("mixer", "attention", {"n_heads": 4}),  # RoPE, no GQA
    ("mixer", "mamba", {"d_state": 16, "dt_rank": 8, "inner_norms": True}),  # LongLLaVA's
    ("mixer", "mamba", {"d_state": 8}),
    ("mixer", "mamba2", {"d_state": 32, "headdim": 16}),
    ("mixer", "mamba2", {"d_state": 16, "headdim": 16, "ngroups": 2, "rmsnorm": False}),
    ("ffn", "mlp", {"d_ff": 160}),
    ("ffn", "moe", {"d_ff": 160, "n_experts": 4, "top_k": 2}),
    ("ffn", "moe", {"d_ff": 160, "n_experts": 1, "top_k": 1}),
]


@pytest.mark.parametrize("trainable", [True, False], ids=["trained", "frozen"])
@pytest.mark.parametrize(
    "kind, name, args", SUBLAYERS, ids=[f"{n}-{i}" for i, (_, n, _) in enumerate(SUBLAYERS)]
)
def test_formula_matches_what_autograd_saves(kind, name, args, trainable):
    """Each sub-layer's formula (PyTorch path, fp32) equals the bytes its forward saves for backward, for a
    trained layer and for a frozen one that gradients flow through (it keeps only what its input gradient
    needs). Allowed slack: parameter-sized tensors (A = -exp(A_log) and the like) and 2%."""
    m = build(kind, {"name": name, **args}, "test", d_model=D, layer_idx=0)
    m.requires_grad_(trainable)
    x = torch.randn(B, L, D, requires_grad=True)
    measured = saved_per_token(lambda: m(x), m, B * L)
    expected = memory._saved(memory.FORMULAS[name](m, settings()), trainable)
    assert measured == pytest.approx(expected, rel=0.02, abs=64), (measured, expected)


def test_mamba2_formula_with_a_partial_chunk():
    m = build("mixer", {"name": "mamba2", "d_state": 16, "headdim": 16}, "test", d_model=D, layer_idx=0)
    length = 200  # chunks of 64: the SSD pads to 256
    x = torch.randn(B, length, D, requires_grad=True)
    measured = saved_per_token(lambda: m(x), m, B * length)
    expected = memory._saved(memory.FORMULAS["mamba2"](m, settings(seq_len=length)), True)
    assert measured == pytest.approx(expected, rel=0.02, abs=64)


def _tiny_experiment(model: dict, **sections) -> tuple:
    from toolkit.assemble import build_tokenizer

    cfg = OmegaConf.merge(
        OmegaConf.create(copy.deepcopy(DEFAULTS)),
        {"model": model, "trainer": {"accelerator": "cpu"}, "name": "memtest", **sections},
    )
    return cfg, build_tokenizer(cfg)


ENCODER = {
    "name": "timm_vit",
    "model_name": "vit_base_patch16_clip_224.openai",
    "img_size": 32,
    "select_layer": -1,
    "freeze": False,
    "model_args": {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
}


def _decoder(pattern: str, vocab: int = 512, n_layers: int | None = None) -> dict:
    return {
        "name": "hybrid",
        "d_model": D,
        "n_layers": n_layers,
        "pattern": pattern,
        "vocab_size": vocab,
        "mixers": {"attention": {"n_heads": 4, "n_kv_heads": 2}, "mamba": {"d_state": 8}},
        "ffns": {"mlp": {"d_ff": 128}, "moe": {"d_ff": 96, "n_experts": 4, "top_k": 2}},
    }


@pytest.mark.parametrize(
    "pattern, trainable, images",
    [
        ("hybrid_1_1", None, 2),  # 4 layers; everything trains, the encoder too
        (
            "*-m-ME*-",
            ["connector.*"],
            3,
        ),  # stage 1: frozen encoder and decoder, gradients flow to the connector
        ("M-*E", ["decoder.layers.1.*"], 1),  # gradients start at layer 1; nothing before it saves
    ],
)
def test_whole_model_activations_match_autograd(pattern, trainable, images):
    """The plan's saved activations for a whole model (encoder, connector, every layer, head and loss) equal
    what one training forward of the same model saves, within 2%."""
    from toolkit.assemble import build_model
    from toolkit.module import select_trainable, token_losses

    decoder = _decoder(pattern, n_layers=4 if pattern.startswith("hybrid") else None)
    if "M" in pattern:
        decoder["mixers"]["mamba2"] = {"d_state": 16, "headdim": 16}
    model_cfg = {
        "encoder": {**ENCODER, "freeze": trainable is not None},
        "pooler": {"name": "pool2d", "stride": 2},
        "connector": {"name": "mlp", "depth": 2},
        "decoder": decoder,
    }
    cfg, tok = _tiny_experiment(model_cfg, optim={"trainable": trainable})
    plan = memory.estimate(cfg, tok, seq_len=L, batch_size=B, images=images, accelerator="cpu")

    model = build_model(cfg, tok)
    select_trainable(model, trainable)
    ids = torch.randint(10, 500, (B, L))
    ids[ids == model.image_token_id] = 10
    ids[:, 1 : 1 + images * model.image_tokens] = model.image_token_id
    imgs = torch.rand(B * images, 3, 32, 32)

    def step():
        loss, n, _ = token_losses(model(ids, imgs), ids)
        return loss

    measured = saved_per_token(step, model, 1)
    assert measured == pytest.approx(plan.activations, rel=0.02), (measured, plan.activations, plan.parts)


# --------------------------------------------------------------------------------------------- the arithmetic
def test_parse_memory():
    assert memory.parse_memory("80GB") == 80 * 10**9
    assert memory.parse_memory("80G") == 80 * 10**9
    assert memory.parse_memory("80 GiB") == 80 * 2**30
    assert memory.parse_memory("80Gi") == 80 * 2**30
    assert memory.parse_memory("1.5TB") == 1_500_000_000_000
    assert memory.parse_memory("512MiB") == 512 * 2**20
    assert memory.parse_memory(1024) == 1024
    for bad in ("80 GBs", "lots", "-3GB", "0GB"):
        with pytest.raises(ChimeraError, match="memory size|positive"):
            memory.parse_memory(bad)


@pytest.fixture(scope="module")
def reference():
    from toolkit.plan import load_plan

    return load_plan(REFERENCE, check_model=False)


@pytest.fixture(scope="module")
def reference_shapes(reference):
    return memory.build_shapes(reference.cfg, reference.tokenizer)


def test_sharding_precision_and_frozen_parts(reference, reference_shapes):
    """FSDP divides parameters, gradients and optimizer state by the devices, DDP does not (and keeps bucket
    copies of the gradients); frozen parameters have neither gradients nor optimizer state; bf16-mixed keeps
    fp32 parameters and adds 16-bit copies, bf16-true halves everything."""
    sh = reference_shapes
    P, T = sh.params_total, sh.params_trainable
    assert 9.5e9 < P < 9.7e9  # chimera describe: 9.60B (decoder ~9.3B + CLIP ViT-L)
    assert T == sh.part_params["connector"][1] > 0  # optim.trainable: connector.* only
    s = settings(accelerator="cuda", devices=8, processes_per_node=8, seq_len=4096, batch_size=1, images=4)
    fsdp = memory.compute(sh, replace(s, strategy="fsdp", precision="bf16-mixed"))
    assert fsdp.params == P * 4 // 8 and fsdp.grads == T * 4 // 8 and fsdp.optimizer == 2 * T * 4 // 8
    assert fsdp.weight_copies > 0  # the all-gathered bf16 units
    ddp = memory.compute(sh, replace(s, strategy="ddp", precision="bf16-mixed"))
    assert ddp.params == P * 4 and ddp.grads == T * 4 and ddp.grad_buckets == T * 4 and ddp.optimizer == 8 * T
    # autocast's bf16 copies of every weight gradients flow through (frozen decoder and connector; the embedding
    # is a lookup, not cast)
    flowing = sh.part_params["decoder"][0] + sh.part_params["connector"][0] - sh.vocab * sh.d_model
    assert ddp.weight_copies == pytest.approx(2 * flowing, rel=1e-4)
    true16 = memory.compute(sh, replace(s, strategy="fsdp", precision="bf16-true"))
    assert true16.params == P * 2 // 8 and true16.optimizer == 2 * T * 2 // 8
    assert true16.activations == fsdp.activations  # both compute in bf16
    fp32 = memory.compute(sh, replace(s, strategy="fsdp", precision="32-true"))
    assert fp32.activations > 1.8 * fsdp.activations
    # checkpointing keeps one input per layer instead of everything
    ckpt = memory.compute(sh, replace(s, strategy="fsdp", precision="bf16-mixed", checkpointing=True))
    assert ckpt.activations_checkpointed < fsdp.activations / 5
    assert ckpt.train_peak == ckpt.train_peak_checkpointing < fsdp.train_peak
    # everything trains: gradients and AdamW state for every parameter
    all_trained = memory.build_shapes(reference.cfg, reference.tokenizer, trainable=["*"])
    full = memory.compute(all_trained, replace(s, strategy="fsdp", precision="bf16-mixed"))
    assert full.grads == P * 4 // 8 and full.optimizer == 2 * P * 4 // 8
    assert full.activations > fsdp.activations  # trained weights keep their inputs too


def test_memory_policy_keys(reference_shapes):
    """strategy.init/frozen_dtype/shard_frozen/activation_checkpointing (a list of kinds)/reshard_after_forward,
    as toolkit.strategies applies them (docs/training.md, "Memory policy")."""
    sh = reference_shapes
    P = sh.params_total
    encoder, decoder = sh.part_params["encoder"][0], sh.part_params["decoder"][0]
    s = settings(
        accelerator="cuda", strategy="fsdp", precision="bf16-mixed", devices=16, processes_per_node=8,
        seq_len=8192, batch_size=1, images=8,
    )  # fmt: skip
    eager = memory.compute(sh, s)
    assert eager.host_build == 8 * P * 4  # every rank builds the whole fp32 model first
    meta = memory.compute(sh, replace(s, init="meta"))
    assert meta.host_build == 8 * encoder * 4  # only the encoder is built for real
    # the frozen encoder and decoder (only the connector trains) stored in bf16, whole on every rank
    kept = memory.compute(sh, replace(s, frozen_bytes=2, shard_frozen=False))
    connector = sh.part_params["connector"][0]
    assert kept.params == pytest.approx((encoder + decoder) * 2 + connector * 4 / 16, abs=16)
    assert kept.weight_copies < eager.weight_copies  # nothing frozen is all-gathered any more
    sharded = memory.compute(sh, replace(s, frozen_bytes=2))
    assert sharded.params == pytest.approx(((encoder + decoder) * 2 + connector * 4) / 16, abs=16)
    # checkpointing by kind: the Mamba layers only needs less than no checkpointing, more than every unit
    every = memory.compute(sh, replace(s, checkpointing=True))
    mamba_only = memory.compute(sh, replace(s, checkpointing=("mamba",)))
    assert every.train_peak < mamba_only.train_peak < eager.train_peak
    assert mamba_only.train_peak == mamba_only.train_peak_checkpointing
    # keeping every unit gathered after the forward costs all of them at once
    whole = memory.compute(sh, replace(s, reshard_after_forward=False))
    auto = memory.compute(sh, replace(s, reshard_after_forward="auto"))
    assert eager.weight_copies < auto.weight_copies < whole.weight_copies


def test_reference_inference_caches(reference_shapes):
    """KV cache and SSM state come from the mixers' own allocate_cache (built on the meta device)."""
    plan = memory.compute(
        reference_shapes, settings(accelerator="cuda", precision="bf16-mixed", seq_len=100_000, images=0)
    )
    # 4 attention layers x (K and V) x 8 KV heads x 128 x 2 bytes per token (Jamba: 8x smaller than dense)
    assert plan.kv_cache == 4 * 2 * 8 * 128 * 2 * 100_000
    # 28 Mamba layers x d_inner 8192 x (d_conv 4 + d_state 16) x 2 bytes, whatever the context
    assert plan.ssm_state == 28 * 8192 * (4 + 16) * 2
    assert plan.inference_weights == plan.params_total * 2
    assert (
        plan.inference_peak
        == plan.inference_weights + plan.kv_cache + plan.ssm_state + plan.prefill_working_set
    )


def test_plan_table_and_json(reference):
    plan = memory.estimate(reference, devices=8, device_memory="80GB", seq_len=40960, batch_size=1)
    text = memory.format_plan(plan)
    for word in ("parameters", "optimizer", "mamba (28 layers)", "attention (4 layers)", "KV cache", "peak"):
        assert word in text, text
    data = json.loads(memory.plan_json(plan))
    assert data["params_total"] == plan.params_total and data["device_memory"] == 80 * 10**9
    assert data["fits_device"] is False and data["train_peak"] > 80 * 10**9
    assert {p["kind"] for p in data["parts"]} >= {"attention", "mamba", "mlp", "moe", "head"}
    assert data["flops_per_token"] > 6 * 20e6  # at least 6 x the trainable parameters


def test_device_error_says_what_to_change(reference):
    plan = memory.estimate(reference, devices=8, device_memory="80GB", seq_len=40960)  # the file as it is
    with pytest.raises(ChimeraError) as err:
        memory.check_fits(plan)
    message = str(err.value)
    assert "\n" not in message
    assert "per device" in message and "80.00 GB" in message and "reference.yaml" in message
    for fix in ("bf16-mixed", "activation_checkpointing=true", "strategy.name=fsdp", "data.batch_size="):
        assert fix in message, message
    # and the last suggestion, applied, fits
    fixed = memory._retry(plan, precision="bf16-mixed", checkpointing=True, strategy="fsdp", batch_size=1)
    assert fixed.train_peak <= 80 * 10**9
    memory.check_fits(fixed, device_memory="80GB")


def test_the_reference_fails_at_once_on_a_24gb_host(reference):
    """`chimera train experiments/longllava/reference.yaml` on a 24 GB CPU machine: the estimate (meta device,
    no weights) fails in seconds with the memory it would need, instead of the kernel killing the build."""
    _reset_peak()
    before = _status("VmHWM:")
    start = time.perf_counter()
    plan = memory.estimate(
        reference, accelerator="cpu"
    )  # the config as it is: trainer.accelerator auto -> cpu
    with pytest.raises(ChimeraError) as err:
        memory.check_fits(plan, host_memory="24GB")
    elapsed = time.perf_counter() - start
    message = str(err.value)
    assert "host memory" in message and "24.00 GB" in message, message
    assert memory.gb(plan.host_peak) in message  # what it would need
    assert plan.host_peak > plan.params_total * 4 > 24e9  # the fp32 weights alone are 38 GB
    assert elapsed < 30, elapsed
    assert _status("VmHWM:") - before < 500e6  # nothing of the model's size was allocated


def test_preflight_uses_this_hosts_memory(reference):
    available = memory.available_host_bytes()
    assert available is None or available > 0
    if available is None or available > 40e9:
        pytest.skip("this host could hold the reference's fp32 weights")
    with pytest.raises(ChimeraError, match="host"):
        memory.preflight(reference)


def test_preflight_can_be_skipped(reference, monkeypatch):
    monkeypatch.setenv("CHIMERA_SKIP_MEMORY_CHECK", "1")
    assert memory.preflight(reference, host_memory="1GB") is None
    monkeypatch.setenv("CHIMERA_SKIP_MEMORY_CHECK", "0")
    with pytest.raises(ChimeraError, match="CHIMERA_SKIP_MEMORY_CHECK=1"):
        memory.preflight(reference, host_memory="1GB")


def test_gpu_ranks_each_build_the_fp32_model_on_the_host(reference):
    """On CUDA every rank builds the whole fp32 model on the host before sharding: 8 ranks need 8 x 38 GB."""
    plan = memory.estimate(
        reference, devices=8, accelerator="cuda", seq_len=4096, batch_size=1, host_memory="256GB"
    )
    assert plan.host_peak == plan.host_build == 8 * plan.params_total * 4
    problems = memory.problems(plan)
    assert len(problems) == 1 and "builds the fp32 model" in problems[0], problems
    assert "strategy.init=meta" in problems[0]  # which builds only the encoder on the host


LLAVA_NEXT = ROOT / "experiments" / "llava" / "llava_next.yaml"


def test_anyres_images_count_their_largest_grid_and_every_view():
    """`chimera plan experiments/llava/llava_next.yaml` (full size, meta device): an AnyRes image is counted at
    its largest grid, 2x2: 576 (global view) + 48 x (48 + 1 newline) = 2,928 decoder tokens and 5 encoder views
    (global view + 4 tiles); the table says so. At the same images per sample it saves 5 times the encoder's and
    the connector's activations of AnyRes off (one 576-token view per image)."""
    from toolkit.plan import load_plan

    plan = load_plan(LLAVA_NEXT, check_model=False)
    on = memory.estimate(plan)  # every stage; the finetune stage (the tower trains too) has the highest peak
    assert on.stage == "finetune" and on.image_tokens == 2928 and on.image_views == 5
    assert on.images_per_sample == 4096 // 2928 == 1  # images fill data.max_length
    text = memory.format_plan(on)
    assert "1 image(s) per sample x 2928 tokens, 5 encoder views each" in text, text
    assert "AnyRes worst case: the 2x2 grid" in text and "global view + 4 tiles" in text, text

    finetune = next(stage for stage in plan.stages if stage.name == "finetune").cfg
    off_cfg = OmegaConf.merge(finetune, {"model": {"vision": {"anyres": False}}})
    # without AnyRes there is no image_newline to train
    off_shapes = memory.build_shapes(
        off_cfg, plan.tokenizer, trainable=["encoder.*", "connector.*", "decoder.*"]
    )
    assert (off_shapes.image_tokens, off_shapes.image_views) == (576, 1)
    off = memory.compute(off_shapes, on._settings)  # the same settings: 1 image per sample
    assert off.images_per_sample == 1 and on.activations > off.activations
    on_parts, off_parts = ({p.kind: p.bytes for p in x.parts} for x in (on, off))
    for part in ("encoder", "connector"):
        assert on_parts[part] == pytest.approx(5 * off_parts[part], rel=1e-6), part
    assert on.flops_per_token > off.flops_per_token


def _reset_peak() -> None:
    """Start this process's peak resident memory (VmHWM) again from the current one (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as exc:
        pytest.skip(f"cannot reset the peak resident memory here: {exc}")


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


# --------------------------------------------------------------------------------------------- a real CPU step
MEASURE = r"""
import gc, json, sys, time
import torch
from toolkit.model import build_model
from toolkit.module import select_trainable, token_losses
from toolkit.strategies import apply_activation_checkpointing

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024

def run(spec):
    torch.manual_seed(0)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak resident set (VmHWM) starts again from the current one
    base = status("VmRSS:")
    model = build_model(spec["model"], vocab_size=spec["vocab"], image_token_id=3)
    select_trainable(model, spec["trainable"])
    if spec["checkpointing"]:
        apply_activation_checkpointing(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    k, S, n = model.image_tokens, model.encoder.image_size, spec["images"]
    start = time.time()
    # a short step first (it creates the gradients and AdamW's state), then the measured one
    for batch, length in ((1, 1 + n * k + 8), (spec["batch"], spec["seq_len"])):
        ids = torch.randint(10, spec["vocab"], (batch, length))
        ids[:, 1 : 1 + n * k] = 3
        labels = ids.clone()
        labels[:, : 1 + n * k] = -100
        images = torch.rand(batch * n, 3, S, S) if n else None
        logits = model(ids, images)
        loss_sum, tokens, _ = token_losses(logits, labels)
        del logits
        opt.zero_grad(set_to_none=True)  # where Lightning does it: after the forward, before backward
        (loss_sum / tokens).backward()
        opt.step()
        del ids, labels, images, loss_sum, tokens
    result = {"growth": status("VmHWM:") - base, "seconds": time.time() - start}
    del model, opt
    gc.collect()
    return result

for spec in json.loads(sys.argv[1]):
    print(json.dumps(run(spec)), flush=True)
"""

_ENC = {
    **ENCODER,
    "img_size": 64,
    "model_args": {"patch_size": 8, "embed_dim": 128, "depth": 2, "num_heads": 4},
}
STEPS = {
    # the first one pays the process's one-time costs (~60 MB: kernel libraries, thread pools); not compared
    "warm-up": dict(
        decoder=_decoder("transformer", 256, n_layers=2),
        trainable=None,
        batch=1,
        seq_len=64,
        images=1,
        checkpointing=False,
    ),
    # everything trains: a 1:1 hybrid (attention, Mamba-1, SwiGLU), the encoder too; ~0.9 GB
    "hybrid": dict(
        decoder={
            "name": "hybrid",
            "d_model": 256,
            "n_layers": 4,
            "pattern": "hybrid_1_1",
            "vocab_size": 16384,
            "mixers": {"attention": {"n_heads": 4}, "mamba": {"d_state": 16}},
            "ffns": {"mlp": {"d_ff": 1024}},
        },
        trainable=None,
        batch=2,
        seq_len=1024,
        images=2,
        checkpointing=False,
    ),
    # stage 1 of a LLaVA recipe: a frozen Transformer (GQA) and encoder, only the connector trains; ~0.5 GB
    "transformer": dict(
        decoder={
            "name": "hybrid",
            "d_model": 256,
            "n_layers": 6,
            "pattern": "transformer",
            "vocab_size": 8192,
            "mixers": {"attention": {"n_heads": 4, "n_kv_heads": 2}},
            "ffns": {"mlp": {"d_ff": 1024}},
        },
        frozen_encoder=True,
        trainable=["connector.*"],
        batch=2,
        seq_len=1024,
        images=4,
        checkpointing=False,
    ),
    # Mamba-2, MoE and attention under activation checkpointing; ~0.4 GB
    "mamba2-moe-checkpointed": dict(
        decoder={
            "name": "hybrid",
            "d_model": 256,
            "n_layers": 4,
            "pattern": "M-ME*-ME",
            "vocab_size": 8192,
            "mixers": {"attention": {"n_heads": 4}, "mamba2": {"d_state": 32, "headdim": 32}},
            "ffns": {"mlp": {"d_ff": 1024}, "moe": {"d_ff": 512, "n_experts": 4, "top_k": 2}},
        },
        trainable=None,
        batch=2,
        seq_len=1024,
        images=1,
        checkpointing=True,
    ),
}


@pytest.fixture(scope="module")
def measured_steps():
    """Peak resident memory growth of one training step per config, all in one fresh process (one import).

    Each config starts from a reset peak (``/proc/self/clear_refs``). glibc's mmap threshold is pinned at
    64 KiB so that every tensor is its own mapping, returned to the system when freed: resident memory then
    follows the live tensors instead of what the heap keeps after an earlier config.
    """
    specs = []
    for spec in STEPS.values():
        model = {
            "encoder": {**_ENC, "freeze": bool(spec.get("frozen_encoder"))},
            "pooler": {"name": "pool2d", "stride": 2},
            "connector": {"name": "mlp", "depth": 2},
            "decoder": spec["decoder"],
        }
        specs.append({**spec, "model": model, "vocab": spec["decoder"]["vocab_size"]})
    _reset_peak()  # skips where /proc/self/clear_refs is not writable (the subprocess needs it too)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps(specs)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return dict(zip(STEPS, zip(specs, results)))


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in STEPS if n != "warm-up"])
def test_estimate_within_15_percent_of_a_measured_cpu_step(name, measured_steps):
    spec, result = measured_steps[name]
    cfg, tok = _tiny_experiment(
        spec["model"],
        optim={"trainable": spec["trainable"]},
        strategy={"activation_checkpointing": spec["checkpointing"]},
    )
    plan = memory.estimate(
        cfg, tok, seq_len=spec["seq_len"], batch_size=spec["batch"], images=spec["images"], accelerator="cpu"
    )
    assert plan.train_peak > 300e6  # large enough that fixed costs do not decide the outcome
    ratio = plan.train_peak / result["growth"]
    assert 0.85 <= ratio <= 1.15, (name, plan.train_peak, result, memory.format_plan(plan))
