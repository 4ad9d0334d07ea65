"""``chimera bench vision``: what the vision path costs on the hardware at hand, as two side-by-side ratios.

1. ``encode``: encoder -> pooler -> connector over ``n_images`` images, all in ONE batched call against one
   image per call (the same parts, weights and pixels; no grad, eval mode, as a frozen tower runs in
   training). The toolkit encodes every view of a batch (images, AnyRes tiles, video frames) in one call
   because a batch of small matrices wastes the cores a single large one keeps busy; ``batched_speedup`` =
   one-by-one seconds / batched seconds (the issue asks for > 1).
2. ``decoder_step``: one decoder training step (forward, loss on the text positions, backward) on a sample of
   ``images_per_sample`` images at 576 tokens each (CLIP ViT-L/14-336's 24 x 24 patches, no pooling) against
   the same sample at 144 tokens each (2D pooling stride 2: 12 x 12, LongLLaVA's setting). The image features
   are written into the image positions with the model's ``masked_scatter`` and take gradients (as a trained
   connector's output does). ``ratio_576_over_144`` = step seconds at 576 / at 144 (4x fewer tokens; the issue
   asks for >= 2x faster).

Both sides of each comparison run interleaved (A B A B ...), after one untimed call each, and each figure is
the best of ``repeats`` (a shared machine only ever adds time); every raw time is reported beside it. The
parts are built through the registry from the nodes in ``ENCODE_PARTS`` / ``DECODER`` (narrow, so the whole
bench takes about a minute on two cores); pass other nodes to measure other sizes. Keys::

    encode.batched_speedup             one_by_one_s / batched_s   (raw: batched_s, one_by_one_s, *_all)
    decoder_step.ratio_576_over_144    step_576_s / step_144_s    (raw: step_576_s, step_144_s, *_all)
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

# The encode path: a CLIP-architecture ViT at 224 px with 14 px patches (16 x 16 = 256 patch tokens, the
# geometry of CLIP-L/14-224) but narrow and shallow, pool2d stride 2 (64 tokens), mlp2x_gelu into d_model.
ENCODE_PARTS: dict[str, dict[str, Any]] = {
    "encoder": {
        "name": "timm_vit",
        "model_name": "vit_large_patch14_clip_quickgelu_224.openai",
        "img_size": 224,
        "select_layer": -1,
        "freeze": True,
        "model_args": {"embed_dim": 192, "depth": 2, "num_heads": 3},
    },
    "pooler": {"name": "pool2d", "stride": 2},
    "connector": {"name": "mlp", "depth": 2},
}
# The decoder: a narrow Llama-shaped Transformer (LLaVA's decoder kind), 8 x 576 = 4,608 image tokens a sample.
DECODER: dict[str, Any] = {
    "name": "hybrid",
    "d_model": 256,
    "n_layers": 2,
    "pattern": "transformer",
    "vocab_size": 512,
    "mixers": {"attention": {"n_heads": 4}},
    "ffns": {"mlp": {"d_ff": 688}},
}
TEXT_TOKENS = 64  # prompt and answer tokens around the images of one sample
QUICK = {  # a smoke test of the same code and keys (tests): tiny parts, few images, one image per sample
    "n_images": 8,
    "images_per_sample": 1,
    "tokens": (576, 144),
    "repeats": 1,
    "encode_parts": {
        **ENCODE_PARTS,
        "encoder": {
            **ENCODE_PARTS["encoder"],
            "img_size": 56,
            "model_args": {"embed_dim": 32, "depth": 1, "num_heads": 2},
        },
    },
    "decoder": {
        **DECODER,
        "d_model": 32,
        "mixers": {"attention": {"n_heads": 2}},
        "ffns": {"mlp": {"d_ff": 64}},
    },
}


def _interleaved(fns: Mapping[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Wall seconds of each function, called in turn ``repeats`` times (who goes first alternates), after
    one untimed call each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def bench_encode(
    parts: Mapping[str, Mapping[str, Any]] = ENCODE_PARTS,
    n_images: int = 64,
    d_model: int = DECODER["d_model"],
    repeats: int = 3,
) -> dict[str, Any]:
    """Images/s of encoder -> pooler -> connector: ``n_images`` in one call vs one image per call."""
    from toolkit.registry import build

    torch.manual_seed(0)
    encoder = build("encoder", dict(parts["encoder"]), "bench.encoder")
    pooler = build(
        "pooler", dict(parts["pooler"]), "bench.pooler", grid=encoder.grid, n_tokens=encoder.num_tokens
    )
    connector = build(
        "connector",
        dict(parts["connector"]),
        "bench.connector",
        in_dim=encoder.embed_dim,
        out_dim=d_model,
        grid=getattr(pooler, "out_grid", encoder.grid),
    )
    path = torch.nn.Sequential(encoder, pooler, connector).eval()
    size = int(encoder.image_size)
    images = torch.rand(n_images, 3, size, size)  # [N, 3, S, S] in [0, 1]

    def batched() -> torch.Tensor:
        return path(images)  # [N, P', d_model]

    def one_by_one() -> list[torch.Tensor]:
        return [path(images[i : i + 1]) for i in range(n_images)]

    with torch.inference_mode():
        same = torch.allclose(batched(), torch.cat(one_by_one()), atol=1e-4, rtol=1e-4)
        times = _interleaved({"batched": batched, "one_by_one": one_by_one}, repeats)
    b, o = min(times["batched"]), min(times["one_by_one"])
    return {
        "images": n_images,
        "image_size": size,
        "encoder_tokens": int(encoder.num_tokens),
        "tokens_per_image": int(getattr(connector, "num_tokens", pooler.num_tokens)),
        "parts": {k: copy.deepcopy(dict(v)) for k, v in parts.items()},
        "outputs_match": bool(same),
        "batched_s": b,
        "one_by_one_s": o,
        "batched_images_per_s": n_images / b,
        "one_by_one_images_per_s": n_images / o,
        "batched_speedup": o / b,
        "batched_s_all": times["batched"],
        "one_by_one_s_all": times["one_by_one"],
        "repeats": repeats,
    }


def _decoder_step(decoder: torch.nn.Module, n_images: int, tokens: int) -> Callable[[], float]:
    """One training step's forward + backward on a sample of ``n_images`` images at ``tokens`` tokens each,
    spliced into the text embeddings by ``masked_scatter`` as the model does; returns the step function."""
    from toolkit.module import token_losses

    d_model, vocab = int(decoder.d_model), int(decoder.vocab_size)
    n_image = n_images * tokens
    length = n_image + TEXT_TOKENS
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (1, length), generator=g)  # [1, T]
    is_image = torch.zeros(1, length, dtype=torch.bool)
    is_image[0, TEXT_TOKENS // 2 : TEXT_TOKENS // 2 + n_image] = True  # the prompt's images, then the text
    labels = ids.masked_fill(is_image, -100)  # loss on text positions only
    feats = torch.randn(n_image, d_model, generator=g).requires_grad_(True)  # the connector's output

    def step() -> None:
        embeds = decoder.embed(ids)  # [1, T, D]
        mask = is_image.unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, feats.reshape(-1))
        logits = decoder.logits(decoder(embeds))  # [1, T, vocab]
        loss_sum, n_tokens, _ = token_losses(logits, labels)
        (loss_sum / n_tokens.clamp(min=1)).backward()
        decoder.zero_grad(set_to_none=True)
        feats.grad = None

    return step


def bench_decoder_step(
    node: Mapping[str, Any] = DECODER,
    images_per_sample: int = 8,
    tokens: tuple[int, int] = (576, 144),
    repeats: int = 3,
) -> dict[str, Any]:
    """Decoder training step (fwd + bwd) seconds with ``tokens[0]`` vs ``tokens[1]`` tokens per image."""
    from toolkit.registry import build

    torch.manual_seed(0)
    decoder = build("decoder", dict(node), "bench.decoder").train()
    many, few = int(tokens[0]), int(tokens[1])
    times = _interleaved(
        {
            "many": _decoder_step(decoder, images_per_sample, many),
            "few": _decoder_step(decoder, images_per_sample, few),
        },
        repeats,
    )
    a, b = min(times["many"]), min(times["few"])
    key = f"{many}_over_{few}"
    return {
        "decoder": copy.deepcopy(dict(node)),
        "pattern": decoder.pattern,
        "images_per_sample": images_per_sample,
        "tokens_per_image": [many, few],
        "text_tokens": TEXT_TOKENS,
        f"seq_len_{many}": images_per_sample * many + TEXT_TOKENS,
        f"seq_len_{few}": images_per_sample * few + TEXT_TOKENS,
        "token_ratio": (images_per_sample * many + TEXT_TOKENS) / (images_per_sample * few + TEXT_TOKENS),
        f"step_{many}_s": a,
        f"step_{few}_s": b,
        f"ratio_{key}": a / b,
        f"step_{many}_s_all": times["many"],
        f"step_{few}_s_all": times["few"],
        "repeats": repeats,
    }


def bench_vision(quick: bool = False) -> dict[str, Any]:
    """Everything ``chimera bench vision`` reports, under stable keys (see the module docstring).

    ``quick``: tiny parts, 8 images to encode and one image per sample (a smoke test of the code and the keys,
    not the figures)."""
    if quick:
        encode = bench_encode(
            QUICK["encode_parts"], QUICK["n_images"], QUICK["decoder"]["d_model"], QUICK["repeats"]
        )
        step = bench_decoder_step(
            QUICK["decoder"], QUICK["images_per_sample"], QUICK["tokens"], QUICK["repeats"]
        )
    else:
        encode = bench_encode()
        step = bench_decoder_step()
    return {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "quick": quick,
        "encode": encode,
        "decoder_step": step,
    }


def format_vision(result: dict[str, Any]) -> str:
    """The table ``chimera bench vision`` prints."""
    e, d = result["encode"], result["decoder_step"]
    many, few = d["tokens_per_image"]
    ratio = d[f"ratio_{many}_over_{few}"]
    enc = e["parts"]["encoder"]
    args = enc.get("model_args", {})
    lines = [
        f"vision path on {result['device']} ({result['threads']} torch threads, {result['cpus']} CPUs); "
        f"best of {e['repeats']}, interleaved",
        f"encode: {enc['name']} {enc['model_name']} at {e['image_size']} px (width {args.get('embed_dim')}, "
        f"depth {args.get('depth')}; {e['encoder_tokens']} patch tokens) -> {e['parts']['pooler']['name']} -> "
        f"{e['parts']['connector']['name']}: {e['tokens_per_image']} tokens per image",
        f"  {e['images']} images in one call  {e['batched_s']:8.3f} s  {e['batched_images_per_s']:8.1f} images/s",
        f"  one image per call    {e['one_by_one_s']:8.3f} s  {e['one_by_one_images_per_s']:8.1f} images/s",
        f"  batched_speedup       {e['batched_speedup']:8.2f}x  (target > 1: "
        f"{'ok' if e['batched_speedup'] > 1 else 'BELOW'}; outputs match: {e['outputs_match']})",
        f"decoder training step (fwd + bwd): {d['pattern']} d_model {d['decoder']['d_model']}, "
        f"{d['images_per_sample']} images per sample + {d['text_tokens']} text tokens",
        f"  {many:>4} tokens per image  {d[f'seq_len_{many}']:6d} tokens  {d[f'step_{many}_s']:8.3f} s/step",
        f"  {few:>4} tokens per image  {d[f'seq_len_{few}']:6d} tokens  {d[f'step_{few}_s']:8.3f} s/step",
        f"  ratio_{many}_over_{few}    {ratio:8.2f}x  ({d['token_ratio']:.2f}x the tokens; target >= 2: "
        f"{'ok' if ratio >= 2 else 'BELOW'})",
    ]
    return "\n".join(lines)


def vision_bench_command(as_json: bool = False, quick: bool = False, command: str = "") -> int:
    """``chimera bench vision [--json] [--quick]``: print the table (or the JSON) and the command."""
    import json

    result = bench_vision(quick=quick)
    result["command"] = command or "chimera bench vision" + (" --quick" if quick else "")
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print(format_vision(result))
        print(f"\n(measured by: {result['command']})")
    return 0
