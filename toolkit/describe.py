"""``chimera describe``: build the model on the meta device (no memory) and report its structure.

Parameter counts per part (total and trainable under ``optim.trainable``, and per stage for a recipe), image
tokens per image, the resolved layer pattern and one line per decoder layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

PART_NAMES = ("encoder", "pooler", "connector", "decoder")


def _vocab_and_image_id(cfg: Any) -> tuple[int, int]:
    """The tokenizer's size and image id; a decoder with an explicit vocab_size needs no tokenizer build."""
    from toolkit.data import image_token_id
    from toolkit.train import build_tokenizer

    tok = build_tokenizer(cfg)
    return len(tok), image_token_id(tok)


def describe(config_path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    import torch
    from omegaconf import OmegaConf

    from toolkit.config import load_config, stage_config
    from toolkit.model import build_model, count_params
    from toolkit.module import select_trainable

    cfg = load_config(config_path, overrides)
    vocab, image_id = _vocab_and_image_id(cfg)
    with torch.device("meta"):
        model = build_model(
            OmegaConf.to_container(cfg.model, resolve=True), vocab_size=vocab, image_token_id=image_id
        )
    select_trainable(model, cfg.optim.get("trainable"))
    total, trainable = count_params(model)
    by_part = {}
    for part in PART_NAMES:
        t, tr = count_params(getattr(model, part))
        by_part[part] = {"total": t, "trainable": tr, "name": str(cfg.model[part].name)}
    decoder = model.decoder
    letters = _letter_names()
    layers = [
        {"index": i, "letters": s, "sublayers": [letters.get(ch, ch) for ch in s]}
        for i, s in enumerate(getattr(decoder, "layer_pattern", []))
    ]
    info: dict[str, Any] = {
        "config": str(config_path),
        "name": str(cfg.name),
        "params": {"total": total, "trainable": trainable, "by_component": by_part},
        "image_tokens": model.image_tokens,
        "encoder": {
            "image_size": getattr(model.encoder, "image_size", None),
            "grid": list(model.encoder.grid) if getattr(model.encoder, "grid", None) else None,
            "tokens": getattr(model.encoder, "num_tokens", None),
            "width": getattr(model.encoder, "embed_dim", None),
        },
        "decoder": {
            "d_model": getattr(decoder, "d_model", None),
            "vocab_size": getattr(decoder, "vocab_size", None),
        },
        "pattern": getattr(decoder, "pattern", None),
        "layers": layers,
    }
    stages = list(cfg.get("stages") or [])
    if stages:
        info["stages"] = {}
        for stage in stages:
            scfg = stage_config(cfg, stage)
            for p in model.parameters():
                p.requires_grad_(True)
            names = select_trainable(
                model, scfg.optim.get("trainable"), where=f"stages.{stage['name']}.trainable"
            )
            info["stages"][str(stage["name"])] = {
                "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "trainable_parts": sorted({n.split(".")[0] for n in names}),
            }
    return info


def _letter_names() -> dict[str, str]:
    from toolkit.registry import symbols

    return {s: e.name for s, e in symbols().items()}


def _m(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def format_description(info: dict[str, Any]) -> str:
    p = info["params"]
    lines = [f"experiment    {info['config']}  (name: {info['name']})"]
    for part, v in p["by_component"].items():
        lines.append(
            f"{part:<13} {v['name']:<12} {_m(v['total']):>9} params  {_m(v['trainable']):>9} trainable"
        )
    lines.append(f"{'total':<13} {'':<12} {_m(p['total']):>9} params  {_m(p['trainable']):>9} trainable")
    enc = info["encoder"]
    grid = "x".join(map(str, enc["grid"])) if enc["grid"] else "n/a"
    lines.append(
        f"image tokens  {info['image_tokens']} per image (encoder {enc['image_size']} px, grid {grid}, {enc['tokens']} tokens, width {enc['width']})"
    )
    lines.append(f"pattern       {info['pattern']}")
    if info.get("stages"):
        for name, s in info["stages"].items():
            lines.append(
                f"stage         {name:<16} {_m(s['trainable']):>9} trainable  ({', '.join(s['trainable_parts'])})"
            )
    lines.append("layers:")
    for layer in info["layers"]:
        lines.append(f"  {layer['index']:>3}  {layer['letters']:<4} {' + '.join(layer['sublayers'])}")
    return "\n".join(lines)
