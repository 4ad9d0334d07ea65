"""The layer-pattern grammar: one string says which mixer and which FFN every decoder layer uses.

A pattern is a string of one-letter symbols. Each registered mixer and FFN owns a letter (``@register(...,
symbol=...)``): ``*`` attention, ``m`` Mamba, ``M`` Mamba-2, ``-`` SwiGLU MLP, ``E`` MoE, plus whatever a
plugin registers. Each letter is one pre-norm residual sub-layer, as in Megatron's hybrid strings; a *layer*
starts at a mixer letter and owns the FFN letters after it, so Jamba's layer "Mamba + MoE" is ``mE``.

Presets (``n_layers`` layers, each a mixer followed by one FFN):

    transformer    *-*-*- ...            every layer attention + MLP
    mamba, mamba2  m-m-m- ... / M-M- ... every layer an SSM (the ``ssm`` mixer for ``mamba``) + MLP
    jamba          attention where i % 8 == 4, else SSM; MoE FFN where i % 2 == 1 (Jamba, LongLLaVA)
    hybrid_A_S     A attention : S SSM, spread evenly as Megatron does: n_attn = round(N * A / (A + S)),
                   the SSM layers split into n_attn + 1 equal runs with attention between them

Anything else is an explicit string, e.g. Megatron's 8B hybrid ``M-M-M--M-M*-M-M-M-M--M*-...``; spaces and
``|`` are ignored so long strings can be grouped for reading.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

PRESETS = ("transformer", "mamba", "mamba2", "jamba", "hybrid_1_3", "hybrid_1_7")
_RATIO = re.compile(r"^hybrid_(\d+)_(\d+)$")
_IGNORED = " |\t\n"


class PatternError(ValueError):
    """A malformed pattern; the message names the position and the allowed letters."""


def even_spread(n_layers: int, attn: int, ssm: int) -> list[bool]:
    """Which of ``n_layers`` layers are attention for an ``attn:ssm`` ratio, spread evenly (Megatron-LM).

    n_attn = round(N * attn / (attn + ssm)); the N - n_attn SSM layers are split into n_attn + 1 runs whose
    lengths differ by at most one, longer runs first, with one attention layer between consecutive runs.
    """
    if attn + ssm == 0:
        raise PatternError("hybrid ratio 0:0 has no layers")
    n_attn = int(round(n_layers * attn / (attn + ssm) + 1e-9))
    n_attn = min(n_attn, n_layers)
    if n_attn == n_layers:
        return [True] * n_layers
    n_ssm = n_layers - n_attn
    runs = n_attn + 1
    lengths = [n_ssm // runs + (1 if r < n_ssm % runs else 0) for r in range(runs)]
    out: list[bool] = []
    for r, length in enumerate(lengths):
        out += [False] * length
        if r < n_attn:
            out.append(True)
    return out


def expand_preset(spec: str, n_layers: int, ssm: str = "m") -> str | None:
    """The explicit string for a preset name, or None if ``spec`` is not a preset."""
    if spec == "transformer":
        return "*-" * n_layers
    if spec == "mamba":
        return f"{ssm}-" * n_layers
    if spec == "mamba2":
        return "M-" * n_layers
    if spec == "jamba":
        return "".join(("*" if i % 8 == 4 else ssm) + ("E" if i % 2 == 1 else "-") for i in range(n_layers))
    match = _RATIO.match(spec)
    if match:
        attn = even_spread(n_layers, int(match.group(1)), int(match.group(2)))
        return "".join(("*" if a else ssm) + "-" for a in attn)
    return None


def parse_layers(pattern: str, mixer_symbols: Mapping[str, str], ffn_symbols: Mapping[str, str]) -> list[str]:
    """Split an explicit pattern into layers (a mixer letter followed by its FFN letters).

    ``mixer_symbols``/``ffn_symbols`` map letter -> component name (from the registry). Unknown letters fail
    with their 0-based position in the string as written.
    """
    layers: list[str] = []
    for pos, ch in enumerate(pattern):
        if ch in _IGNORED:
            continue
        if ch in mixer_symbols:
            layers.append(ch)
        elif ch in ffn_symbols:
            if layers:
                layers[-1] += ch
            else:  # an FFN before any mixer forms a layer of its own
                layers.append(ch)
        else:
            allowed = ", ".join(f"'{s}' {n}" for s, n in {**mixer_symbols, **ffn_symbols}.items())
            raise PatternError(
                f"pattern {pattern!r}: character {ch!r} at position {pos} is not a layer letter; "
                f"allowed: {allowed}; or a preset: {', '.join(PRESETS)}, hybrid_<attn>_<ssm>"
            )
    if not layers:
        raise PatternError(f"pattern {pattern!r} has no layers")
    return layers


def resolve(
    spec: str,
    n_layers: int | None,
    mixer_symbols: Mapping[str, str],
    ffn_symbols: Mapping[str, str],
    ssm: str = "m",
) -> list[str]:
    """Preset or explicit pattern -> list of per-layer strings such as ``["m-", "mE", "*-", ...]``."""
    explicit = expand_preset(spec, n_layers, ssm) if n_layers is not None else None
    if explicit is None and (spec in PRESETS or _RATIO.match(spec)):
        raise PatternError(f"pattern preset {spec!r} needs n_layers")
    layers = parse_layers(explicit if explicit is not None else spec, mixer_symbols, ffn_symbols)
    if n_layers is not None and len(layers) != n_layers:
        raise PatternError(
            f"pattern {spec!r} has {len(layers)} layers but n_layers is {n_layers}; "
            "fix one of them or leave n_layers unset for an explicit pattern"
        )
    return layers
