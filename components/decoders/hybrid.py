"""The one decoder for pure Transformer, pure Mamba and hybrids: a stack of layers described by a pattern.

Each layer is pre-norm residual sub-layers, a mixer then its FFNs (Jamba, arXiv 2403.19887; LongLLaVA, arXiv
2409.02889)::

    x ──┬── RMSNorm ── mixer (attention | mamba | mamba2 | plugin) ──(+)──┬── RMSNorm ── ffn (mlp | moe) ──(+)──►
        └──────────────────────────────────────────────────────────────┘  └────────────────────────────────┘

Which mixer and FFN each layer uses comes from ``pattern`` (see ``pattern.py``); their constructor arguments
come from ``mixers``/``ffns``, keyed by component name, so the YAML reads::

    decoder: {name: hybrid, d_model: 4096, n_layers: 32, pattern: jamba,
              mixers: {attention: {n_heads: 32, n_kv_heads: 8}, mamba: {d_state: 16}},
              ffns: {mlp: {d_ff: 14336}, moe: {d_ff: 14336, n_experts: 16, top_k: 2}}}

Mixers and FFNs are built through the registry, so a plugin's mixer joins a pattern by its letter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.decoders import pattern as patterns
from toolkit.errors import ChimeraError
from toolkit.registry import build, get, register, symbols, validate


class DecoderLayer(nn.Module):
    """One layer: an optional mixer and zero or more FFNs, each behind an RMSNorm and a residual."""

    shard_unit = True  # FSDP wraps each layer on its own (toolkit/strategies.py collects these)

    def __init__(self, d_model: int, mixer: nn.Module | None, ffns: list[nn.Module], norm_eps: float) -> None:
        super().__init__()
        self.mixer_norm = nn.RMSNorm(d_model, eps=norm_eps) if mixer is not None else None
        self.mixer = mixer
        self.ffn_norms = nn.ModuleList(nn.RMSNorm(d_model, eps=norm_eps) for _ in ffns)
        self.ffns = nn.ModuleList(ffns)

    def forward(self, x: Tensor, state: Any = None) -> Tensor:
        if self.mixer is not None:
            x = _residual(self.mixer, self.mixer_norm, x, state)
        for norm, ffn in zip(self.ffn_norms, self.ffns):
            x = _residual(ffn, norm, x)
        return x


def _residual(sublayer: nn.Module, norm: nn.RMSNorm, x: Tensor, *state: Any) -> Tensor:
    """x + sublayer(norm(x)). A sub-layer with a ``residual_step(norm, x, *state)`` may compute the whole of it
    in one call (a fused decoding step, ``components.cpu_kernels``) or return None to decline. The norm runs as
    a function: a module call costs as much as the norm itself at one token."""
    fused = getattr(type(sublayer), "residual_step", None)
    if fused is not None and (out := fused(sublayer, norm, x, *state)) is not None:
        return out
    return x + sublayer(_rms_norm(norm, x), *state)


def _rms_norm(norm: nn.RMSNorm, x: Tensor) -> Tensor:
    return F.rms_norm(x, norm.normalized_shape, norm.weight, norm.eps)


@register("decoder", "hybrid")
class HybridDecoder(nn.Module):
    """Token embedding -> layers from a pattern -> RMSNorm -> LM head."""

    def __init__(
        self,
        *,
        d_model: int,
        n_layers: int | None = None,
        pattern: str = "transformer",
        ssm: str = "mamba",
        mixers: dict[str, dict[str, Any]] | None = None,
        ffns: dict[str, dict[str, Any]] | None = None,
        vocab_size: int = 32000,
        norm_eps: float = 1e-6,
        tie_embeddings: bool = False,
    ) -> None:
        super().__init__()
        self.d_model, self.vocab_size = d_model, vocab_size
        self.layer_pattern = self.resolve_pattern(pattern, n_layers, ssm)
        mixers, ffns = mixers or {}, ffns or {}
        letters = symbols()
        layers = []
        for i, layer in enumerate(self.layer_pattern):
            mixer, layer_ffns = None, []
            for ch in layer:
                entry = letters[ch]
                where = f"model.decoder.{'mixers' if entry.kind == 'mixer' else 'ffns'}.{entry.name}"
                args = (mixers if entry.kind == "mixer" else ffns).get(entry.name, {})
                module = build(entry.kind, {"name": entry.name, **args}, where, d_model=d_model, layer_idx=i)
                if entry.kind == "mixer":
                    mixer = module
                else:
                    layer_ffns.append(module)
            layers.append(DecoderLayer(d_model, mixer, layer_ffns, norm_eps))
        self.embed_tokens = nn.Embedding(vocab_size, d_model)
        self.layers = nn.ModuleList(layers)
        self.final_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The decoder's own initialisation, on top of its children's: token embedding (and a head tied to
        it) N(0, 0.02). The constructor ends with it; after a meta-device build ``toolkit.init`` runs it
        after the layers' own ``reset_parameters``."""
        nn.init.normal_(self.embed_tokens.weight, std=0.02)

    @staticmethod
    def resolve_pattern(pattern: str, n_layers: int | None, ssm: str = "mamba") -> list[str]:
        """Pattern (preset or explicit) -> per-layer letter strings, using the registry's letters."""
        letters = symbols()
        mixer_letters = {s: e.name for s, e in letters.items() if e.kind == "mixer"}
        ffn_letters = {s: e.name for s, e in letters.items() if e.kind == "ffn"}
        ssm_entry = get("mixer", ssm, "model.decoder.ssm")
        if not ssm_entry.symbol:
            raise ChimeraError(f"model.decoder.ssm: mixer '{ssm}' has no pattern letter")
        try:
            return patterns.resolve(str(pattern), n_layers, mixer_letters, ffn_letters, ssm_entry.symbol)
        except patterns.PatternError as exc:
            raise ChimeraError(f"model.decoder.pattern: {exc}", key="model.decoder.pattern") from exc

    @classmethod
    def validate_config(cls, kwargs: Mapping[str, Any], where: str) -> None:
        """Config-time checks (no building): the pattern parses, every mixer/ffn argument is known, and every
        mixer and FFN the pattern uses has its required arguments (e.g. ``jamba`` needs ``ffns.moe.d_ff``)."""
        layers = cls.resolve_pattern(
            str(kwargs.get("pattern", "transformer")), kwargs.get("n_layers"), kwargs.get("ssm", "mamba")
        )
        letters = symbols()
        used = {letters[ch].name: letters[ch].kind for layer in layers for ch in layer}
        for group, kind in (("mixers", "mixer"), ("ffns", "ffn")):
            nodes = dict(kwargs.get(group) or {})
            for name in [n for n, k in used.items() if k == kind and n not in nodes]:
                nodes[name] = {}
            for name, args in nodes.items():
                validate(kind, {"name": name, **(args or {})}, f"{where}.{group}.{name}")

    @property
    def pattern(self) -> str:
        """The resolved pattern, one letter per sub-layer, e.g. ``m-mE*-...``."""
        return "".join(self.layer_pattern)

    def embed(self, input_ids: Tensor) -> Tensor:
        """[B, T] -> [B, T, d_model]."""
        return self.embed_tokens(input_ids)

    def allocate_cache(
        self,
        batch_size: int,
        max_len: int,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        pad: Tensor | None = None,
    ) -> list[Any]:
        """One state per layer: a KV cache for attention, conv+SSM states for Mamba, None without a mixer.

        ``pad`` ([batch_size] integers): row b of the batch starts with ``pad[b]`` positions of left padding
        (prompts of different lengths). Each state gets it (``state.pad``): attention masks those keys and
        starts RoPE after them, the SSMs keep their state zero through them. The padding goes through in the
        prefill (one forward of the padded prompts); decoding steps are real tokens.
        """
        states = [
            layer.mixer.allocate_cache(batch_size, max_len, device=device, dtype=dtype)
            if layer.mixer
            else None
            for layer in self.layers
        ]
        if pad is not None and bool((pad > 0).any()):
            pad = pad.to(device=device or self.lm_head.weight.device, dtype=torch.long)
            for i, state in enumerate(states):
                if state is None:
                    continue
                if not hasattr(state, "pad"):
                    raise ChimeraError(
                        f"layer {i}: mixer '{type(self.layers[i].mixer).__name__}' has no left-padding support "
                        "(its state has no 'pad'); generate prompts of equal length, or one at a time"
                    )
                state.pad = pad
        return states

    def forward(self, inputs_embeds: Tensor, cache: list[Any] | None = None) -> Tensor:
        """inputs_embeds: [B, T, d_model] -> final hidden states [B, T, d_model] (after the last norm)."""
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cache[i] if cache is not None else None)
        return _rms_norm(self.final_norm, x)

    def logits(self, hidden: Tensor) -> Tensor:
        """[B, T, d_model] -> [B, T, vocab_size]."""
        return self.lm_head(hidden)

    def aux_loss(self) -> Tensor | None:
        """Sum of the auxiliary losses (MoE load balancing) set by FFNs in the last forward."""
        losses = [
            ffn.aux_loss
            for layer in self.layers
            for ffn in layer.ffns
            if getattr(ffn, "aux_loss", None) is not None
        ]
        return torch.stack(losses).sum() if losses else None

    def shard_units(self) -> list[nn.Module]:
        return list(self.layers)
