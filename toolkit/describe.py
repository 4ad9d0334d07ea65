"""``chimera describe``: build the model on the meta device (no memory) and report its structure.

Parameter counts per part (total and trainable under ``optim.trainable``, and per stage for a recipe; a
parameter outside the four parts, such as LLaVA-NeXT's ``image_newline``, gets its own row), image
tokens per image from the model's token plan (a plain image, a video frame, and an AnyRes 2 x 2 image with
and without newline tokens), the resolved layer pattern and one line per decoder layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from toolkit.plan import Plan, load_plan


def describe(plan: Plan | str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    import torch

    from toolkit.assemble import build_model
    from toolkit.model import PARTS, count_params
    from toolkit.module import select_trainable

    if not isinstance(plan, Plan):
        plan = load_plan(plan, overrides, check_model=False)  # the build below is the check
    cfg = plan.cfg
    with torch.device("meta"):
        model = build_model(cfg, plan.tokenizer)
    select_trainable(model, cfg.optim.get("trainable"))
    total, trainable = count_params(model)
    by_part = {}
    for part in PARTS:
        t, tr = count_params(getattr(model, part))
        by_part[part] = {"total": t, "trainable": tr, "name": str(cfg.model[part].name)}
    # parameters the model holds beside the four parts (LLaVA-NeXT's image_newline), so the rows sum to the total
    for name, child in model.named_children():
        if name not in PARTS and (counts := count_params(child))[0]:
            by_part[name] = {"total": counts[0], "trainable": counts[1], "name": type(child).__name__}
    encoder, decoder = model.encoder, model.decoder
    letters = _letter_names()
    layers = [
        {"index": i, "letters": s, "sublayers": [letters.get(ch, ch) for ch in s]}
        for i, s in enumerate(getattr(decoder, "layer_pattern", []))
    ]
    info: dict[str, Any] = {
        "config": str(plan.config_path),
        "name": plan.name,
        "params": {"total": total, "trainable": trainable, "by_component": by_part},
        "image_tokens": model.image_tokens,
        "tokens_per_image": tokens_per_image(model.token_plan),
        "encoder": {
            "image_size": encoder.image_size,
            "grid": list(encoder.grid) if encoder.grid else None,
            "tokens": encoder.num_tokens,
            "width": encoder.embed_dim,
        },
        "decoder": {"d_model": decoder.d_model, "vocab_size": decoder.vocab_size},
        "pattern": getattr(decoder, "pattern", None),
        "layers": layers,
    }
    if plan.staged:
        info["stages"] = {}
        for stage in plan.stages:
            for p in model.parameters():
                p.requires_grad_(True)
            names = select_trainable(
                model, stage.cfg.optim.get("trainable"), where=f"{stage.label}: trainable"
            )
            info["stages"][stage.name] = {
                "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "trainable_parts": sorted({n.split(".")[0] for n in names}),
            }
    return info


def tokens_per_image(plan: Any) -> dict[str, Any]:
    """Decoder positions per image from the token plan: a plain image (or a video frame), and an AnyRes image
    of 2 x 2 tiles (``2S x 2S`` pixels) with and without the newline embedding, under the configured layout
    and unpadding (reported even when AnyRes is off, as what turning it on would cost; None when the layout
    cannot apply to these tokens)."""
    from dataclasses import replace

    from toolkit.errors import ChimeraError

    s = plan.settings
    out: dict[str, Any] = {
        "image": plan.view_tokens,
        "frame": plan.frame_tokens,
        "grid": list(plan.view_grid) if plan.view_grid else None,
        "anyres": s.anyres,
        "layout": s.layout,
        "unpad": s.unpad,
    }
    side = 2 * plan.image_size
    try:
        on = replace(plan, settings=replace(s, anyres=True))
    except ChimeraError:
        out["anyres_2x2"] = None
        return out
    row = on.row(side, side, (2, 2))
    out["anyres_2x2"] = {
        "size": [side, side],
        "newline": on.tokens(row, newline=True),
        "no_newline": on.tokens(row, newline=False),
    }
    return out


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
    t = info["tokens_per_image"]
    if t["frame"] != t["image"]:
        lines.append(f"video frame   {t['frame']} tokens per frame (model.vision.frame_stride)")
    if t["anyres_2x2"] is not None:
        a = t["anyres_2x2"]
        state = "on" if t["anyres"] else "off: model.vision.anyres=true turns it on"
        lines.append(
            f"anyres 2x2    {a['size'][0]}x{a['size'][1]} px image: {a['newline']} tokens with newline, "
            f"{a['no_newline']} without (layout {t['layout']}, unpad {'on' if t['unpad'] else 'off'}; AnyRes {state})"
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
