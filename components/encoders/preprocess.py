"""Image preprocessing from an encoder's timm data config: an image -> ``FloatTensor[3, H, W]`` in [0, 1].

The encoders normalise inside their forward (each tower with its own mean/std), so preprocessing stops at
[0, 1]: it only decides how an arbitrary image becomes an ``H x W`` one. Three ways, all with the
interpolation of timm's data config (``bicubic`` for CLIP and SigLIP):

- ``resize``: squash to ``H x W`` (aspect ratio not kept; SigLIP's own processor does this).
- ``center_crop``: timm's eval transform: resize the shorter side to ``floor(size / crop_pct)``, keep the
  aspect ratio, crop the centre ``H x W`` (CLIP's processor with ``crop_pct`` 1.0: shorter side 336, centre
  crop 336).
- ``pad``: LLaVA-1.5's letterbox (``expand2square`` in haotian-liu/LLaVA ``llava/mm_utils.py``): paste the
  image in the middle of a canvas of the target aspect ratio filled with the mean colour
  (``int(255 * mean)`` per channel, as LLaVA), then resize; nothing is cropped.

The image is a Pillow image (any mode; real data) or a float tensor ``[3, h, w]`` in [0, 1] (the synthetic
datasets draw tensors). A tensor that already has the output size and needs no crop is returned as it is (so
synthetic data drawn at the encoder's size is not touched); any other tensor is quantised to 8 bits (as a PNG
export of it would be) and takes the Pillow path, so one function gives one result for both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from PIL import Image
from timm.data.transforms import str_to_interp_mode
from torchvision.transforms import functional as TF

Mode = Literal["resize", "center_crop", "pad"]
MODES: tuple[str, ...] = ("resize", "center_crop", "pad")


def make_transform(
    data_config: Mapping[str, Any], mode: Mode = "pad"
) -> Callable[[Image.Image | torch.Tensor], torch.Tensor]:
    """A function ``image -> FloatTensor[3, H, W]`` in [0, 1] for an encoder's data config.

    ``data_config`` is timm's (``resolve_model_data_config``; ``encoder.data_config`` holds it with the
    encoder's real ``input_size``): ``input_size`` ``(3, H, W)``, ``interpolation``, ``mean`` and, for
    ``center_crop``, ``crop_pct`` (default 1.0).
    """
    if mode not in MODES:
        raise ValueError(f"preprocessing mode '{mode}' is not supported; allowed: {', '.join(MODES)}")
    height, width = (int(s) for s in data_config["input_size"][-2:])
    interpolation = str_to_interp_mode(str(data_config.get("interpolation", "bicubic")))
    fill = tuple(int(255 * float(m)) for m in data_config.get("mean", (0.0, 0.0, 0.0)))
    crop_pct = float(data_config.get("crop_pct") or 1.0)

    untouched = mode != "center_crop" or (math.floor(height / crop_pct), math.floor(width / crop_pct)) == (
        height,
        width,
    )

    def transform(image: Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            if untouched and tuple(image.shape) == (3, height, width):
                return image.float()
            image = to_pil(image)
        image = image.convert("RGB")
        if mode == "pad":
            image = letterbox(image, width / height, fill)
            image = TF.resize(image, [height, width], interpolation=interpolation)
        elif mode == "resize":
            image = TF.resize(image, [height, width], interpolation=interpolation)
        else:
            scale = (math.floor(height / crop_pct), math.floor(width / crop_pct))
            if scale[0] == scale[1]:  # shorter side to `scale`, as torchvision's Resize(int) in timm
                image = TF.resize(image, scale[0], interpolation=interpolation)
            else:  # keep the ratio, cover the whole scaled box
                w, h = image.size
                ratio = max(scale[0] / h, scale[1] / w)
                image = TF.resize(image, [round(h * ratio), round(w * ratio)], interpolation=interpolation)
            image = TF.center_crop(image, [height, width])
        return TF.to_tensor(image)  # [3, H, W] float in [0, 1]

    return transform


def letterbox(image: Image.Image, aspect: float, fill: tuple[int, ...]) -> Image.Image:
    """Expand ``image`` to the aspect ratio ``width / height = aspect`` with ``fill``-coloured bands, the image
    centred (LLaVA's ``expand2square`` for ``aspect`` 1: offset ``(long - short) // 2``)."""
    w, h = image.size
    if w == round(h * aspect):
        return image
    if w > h * aspect:  # too wide: bands above and below
        new_w, new_h = w, round(w / aspect)
    else:  # too tall: bands left and right
        new_w, new_h = round(h * aspect), h
    canvas = Image.new(image.mode, (new_w, new_h), fill)
    canvas.paste(image, ((new_w - w) // 2, (new_h - h) // 2))
    return canvas


def to_pil(image: torch.Tensor) -> Image.Image:
    """A float tensor ``[3, h, w]`` in [0, 1] -> an RGB Pillow image (rounded to 8 bits)."""
    if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
        raise ValueError(
            f"expected a float image tensor [3, h, w] in [0, 1], got {tuple(image.shape)} {image.dtype}"
        )
    pixels = image.detach().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    return Image.fromarray(pixels.cpu().numpy(), "RGB")


def image_size_of(image: Image.Image | torch.Tensor) -> tuple[int, int]:
    """``(width, height)`` of a Pillow image or a ``[3, h, w]`` tensor."""
    if isinstance(image, torch.Tensor):
        return int(image.shape[-1]), int(image.shape[-2])
    return image.size
