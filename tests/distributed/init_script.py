"""Run as ``torchrun --nproc-per-node=2 init_script.py OUT_DIR`` (2 CPU processes over gloo; not collected).

Every rank builds the same small multimodal model twice: eagerly (the reference, seed 0) and on the meta
device, sharded by ``toolkit.strategies.fsdp2_sharder`` and materialised shard by shard (``toolkit.init``).
The decoder has every layer kind (attention, Mamba with inner norms, Mamba-2, SwiGLU, MoE), the connector is
a C-Abstractor (timm RegStage blocks), the encoder a timm ViT: each initialisation path runs on DTensor shards.

Rank 0 writes ``OUT_DIR/result.json``:

- ``init``: per tensor, the gathered meta-built tensor against the eager one (equal?, mean/std of both) and
  whether the two ranks' halves hold the same numbers (they must not: duplicated rows);
- ``load_safetensors`` / ``load_ckpt``: the eager weights exported to a file, loaded straight into a fresh
  meta-built, sharded model (each rank reads its rows / rank 0 broadcasts): tensors and logits equal?
- ``policy``: with ``part_precision={decoder: bf16-mixed}`` and ``reshard_after_forward="auto"``, each
  unit's mixed-precision policy and whether it reshards after forward; the logits' dtype.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402

from toolkit.model import build_model  # noqa: E402
from toolkit.strategies import fsdp2_sharder  # noqa: E402

VOCAB, IMG = 100, 3
MODEL = {
    "encoder": {
        "name": "timm_vit",
        "model_name": "vit_base_patch16_clip_224.openai",
        "img_size": 16,
        "select_layer": -1,
        "freeze": False,
        "model_args": {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
    },
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


def eager(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(MODEL, vocab_size=VOCAB, image_token_id=IMG)


def meta_sharded(mesh, **kwargs):
    with torch.device("meta"):
        model = build_model(MODEL, vocab_size=VOCAB, image_token_id=IMG)
    fsdp2_sharder("32-true", **kwargs)(model, mesh, torch.device("cpu"))
    return model


def gathered(model) -> dict[str, torch.Tensor]:
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
        for k, v in model.state_dict().items()
    }


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, VOCAB, (2, 12), generator=g)
    ids[:, 1:5] = IMG  # 4 image tokens per sample (c_abstractor: 4 queries)
    return ids, torch.rand(2, 3, 16, 16, generator=g)


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("data_parallel",))
    out_dir = Path(out)
    reference = eager(0)
    ref_state = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    other_seed = {k: v.detach().clone() for k, v in eager(1).state_dict().items()}
    ids, images = batch()
    with torch.no_grad():
        ref_logits = reference(ids, images)
    result: dict = {"init": {}}

    model = meta_sharded(mesh, seed=0)
    full = gathered(model)
    for name, value in full.items():
        ref = ref_state[name]
        n = value.shape[0] if value.ndim else 0
        halves = None
        if value.ndim >= 1 and n >= 4 and n % 2 == 0 and value.is_floating_point():
            halves = bool(torch.equal(value[: n // 2], value[n // 2 :]))
        result["init"][name] = {
            "shape": list(value.shape),
            "dtype": str(value.dtype),
            "equal": bool(torch.equal(value, ref)),
            "deterministic": bool(torch.equal(ref, other_seed[name])),  # the eager init draws nothing
            "finite": bool(torch.isfinite(value).all()) if value.is_floating_point() else True,
            "halves_equal": halves,
            "numel": value.numel(),
            "mean": float(value.float().mean()),
            "std": float(value.float().std()) if value.numel() > 1 else 0.0,
            "ref_mean": float(ref.float().mean()),
            "ref_std": float(ref.float().std()) if ref.numel() > 1 else 0.0,
        }
    with torch.no_grad():
        logits = model(ids, images)
    result["init_logits_finite"] = bool(torch.isfinite(logits).all())
    del model

    # the eager weights, exported as a stage hand-off would be, then loaded straight into the shards
    from toolkit.checkpointing import export_weights

    files = {"load_safetensors": out_dir / "eager.safetensors", "load_ckpt": out_dir / "eager.ckpt"}
    if rank == 0:
        for path in files.values():
            export_weights(ref_state, path)
    dist.barrier()
    for key, path in files.items():
        model = meta_sharded(mesh, seed=123, init_from=str(path))
        full = gathered(model)
        with torch.no_grad():
            logits = model(ids, images)
        result[key] = {
            "unequal": [k for k, v in full.items() if not torch.equal(v, ref_state[k])],
            "keys_match": sorted(full) == sorted(ref_state),
            "logits_max_diff": float((logits - ref_logits).abs().max()),
        }
        del model

    # per-part precision and reshard_after_forward=auto: the decoder's layers gather in bf16 and hand back
    # fp32; every unit but the last one run reshards after forward
    model = meta_sharded(mesh, seed=0, reshard_after_forward="auto", part_precision={"decoder": "bf16-mixed"})
    units = []
    for name, module in model.named_modules():
        state = getattr(module, "_get_fsdp_state", None)
        group = state()._fsdp_param_group if state is not None else None
        if group is not None and name:
            policy = state()._mp_policy
            units.append(
                {
                    "name": name,
                    "param_dtype": str(policy.param_dtype),
                    "output_dtype": str(policy.output_dtype),
                    "reshard": group.post_forward_mesh_info is not None,
                }
            )
    with torch.no_grad():
        logits = model(ids, images)
    result["policy"] = {
        "units": units,
        "logits_dtype": str(logits.dtype),
        "logits_finite": bool(torch.isfinite(logits).all()),
    }
    if rank == 0:
        (out_dir / "result.json").write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
