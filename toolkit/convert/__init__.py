"""Hugging Face checkpoints <-> Chimera parts, and export.

- ``decoder_from_hf(path)``: a ``HybridDecoder`` with the shape (config.json) and the weights (lazy safetensors,
  meta-device materialisation) of a Llama / Mistral / Qwen2 / Jamba / Mamba / Mamba-2 model, or of the
  language model inside a LLaVA checkpoint.
- ``prepare_node(part, node, where)`` / ``load_part_init(model, part, init)``: the per-part ``init:`` config
  key (``toolkit/convert/parts.py`` documents it): ``init`` removed before the constructor, applied after.
- ``export_hf(model_or_decoder, tokenizer, out_dir)``: the decoder as a transformers model;
  ``export_vlm(model, cfg_yaml_text, out_dir)``: the whole VLM as safetensors + its resolved YAML.

One small key map per family (``llama.py``, ``jamba.py``, ``mamba.py``, ``mamba2.py``), read forwards to load
and backwards to export (litgpt's ``convert_hf_checkpoint.py`` / ``convert_lit_checkpoint.py``). The toolkit
builds the decoder through the registry (``hybrid``); nothing here imports a component.
"""

from __future__ import annotations

from toolkit.convert.decoder import decoder_from_hf, hf_tensors, load_hf_weights
from toolkit.convert.export import export_hf, export_vlm, infer_model_type
from toolkit.convert.hf_config import FAMILIES, decoder_kwargs, read_config
from toolkit.convert.parts import (
    decoder_node,
    load_model_init,
    load_part_init,
    prepare_node,
    split_init,
    validate_init,
)

__all__ = [
    "FAMILIES",
    "decoder_from_hf",
    "decoder_kwargs",
    "decoder_node",
    "export_hf",
    "export_vlm",
    "hf_tensors",
    "infer_model_type",
    "load_hf_weights",
    "load_model_init",
    "load_part_init",
    "prepare_node",
    "read_config",
    "split_init",
    "validate_init",
]
