"""What the toolkit reads from each kind of part: one Protocol per kind, checked when a part is built.

A plugin author reads this file to learn what to implement. Parts stay plain ``nn.Module`` s (or datasets);
nothing here is a base class to inherit from. ``registry.build`` calls ``check(kind, obj, name)`` on every
object it constructs, so a plugin that lacks an attribute fails at build time with a message naming the
plugin, the attribute and the contract, instead of an ``AttributeError`` deep inside a training step.

Each Protocol lists the REQUIRED members (annotated attributes and methods). Optional members the toolkit
uses when present are listed in ``OPTIONAL`` with what they are for. ``DERIVED`` names the constructor
arguments the toolkit fills in from neighbouring parts; a user never writes them in YAML.

The data flow these contracts serve (``toolkit/model.py``)::

    images [N,3,H,W] -> encoder -> [N, P, embed_dim] -> pooler -> [N, P', C] -> connector -> [N, P', d_model]
    input_ids [B,T] -> decoder.embed -> splice image features -> decoder -> decoder.logits -> [B, T, vocab]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from toolkit.errors import ChimeraError

if TYPE_CHECKING:  # torch stays out of import time: `chimera --help` and config errors come back fast
    from torch import Tensor


class Encoder(Protocol):
    """A vision tower. ``forward(images [N, 3, image_size, image_size] in [0, 1]) -> [N, num_tokens, embed_dim]``.

    ``grid`` is the patch grid ``(rows, cols)`` when the tokens are exactly the patches (None when prefix
    tokens such as CLS are kept), so a 2D pooler can reshape them.
    """

    embed_dim: int
    num_tokens: int
    image_size: int
    grid: tuple[int, int] | None

    def forward(self, images: Tensor) -> Tensor: ...


class Pooler(Protocol):
    """Reduces tokens per image. ``forward([N, P, C]) -> [N, num_tokens, C]``; receives ``grid`` and
    ``n_tokens`` (the encoder's) as derived arguments."""

    num_tokens: int

    def forward(self, tokens: Tensor) -> Tensor: ...


class Connector(Protocol):
    """Projects encoder width to decoder width. ``forward([N, P, in_dim]) -> [N, P', out_dim]``; receives
    ``in_dim``, ``out_dim`` and ``grid`` (the patch grid of the tokens it receives, or None) as derived
    arguments. ``P' = P`` unless the connector reduces tokens itself and says so with ``num_tokens``."""

    def forward(self, features: Tensor) -> Tensor: ...


class Decoder(Protocol):
    """The language model: embeddings, layers, head, and an inference cache."""

    d_model: int
    vocab_size: int

    def embed(self, input_ids: Tensor) -> Tensor: ...  # [B, T] -> [B, T, d_model]

    def forward(self, inputs_embeds: Tensor, cache: list[Any] | None = None) -> Tensor: ...

    def logits(self, hidden: Tensor) -> Tensor: ...  # [B, T, d_model] -> [B, T, vocab_size]

    def allocate_cache(
        self, batch_size: int, max_len: int, *, device: Any = None, dtype: Any = None
    ) -> list[Any]: ...


class Mixer(Protocol):
    """A sequence mixer inside a decoder layer (attention, Mamba, ...); registered with a pattern letter.

    ``forward(x [B, T, d_model], state) -> [B, T, d_model]`` where ``state`` is None in training and the
    object ``allocate_cache`` returned during generation. Receives ``d_model`` and ``layer_idx``.
    """

    def forward(self, x: Tensor, state: Any = None) -> Tensor: ...

    def allocate_cache(
        self, batch_size: int, max_len: int, *, device: Any = None, dtype: Any = None
    ) -> Any: ...


class FFN(Protocol):
    """A channel mixer inside a decoder layer (MLP, MoE); ``forward([B, T, d_model]) -> [B, T, d_model]``.
    Receives ``d_model`` and ``layer_idx``."""

    def forward(self, x: Tensor) -> Tensor: ...


class Dataset(Protocol):
    """A map-style dataset of LLaVA-format samples:
    ``{"id": str, "images": FloatTensor[n, 3, H, W] | [Pillow images or [3, h, w] tensors] | None,
    "conversations": [{"from", "value"}, ...], "frames"?: [[image indices of one video], ...]}``.
    Images may have any size: the collator's vision path (``toolkit/data/vision.py``) preprocesses, tiles
    and counts them. Receives ``image_size`` (the encoder's input side) when its constructor takes it."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


class Template(Protocol):
    """A prompt template (``toolkit/data/template.py`` holds the shared machinery): renders a LLaVA
    conversation for a tokenizer as ids plus the assistant mask; ``words()`` and ``markup`` feed the offline
    word-level tokenizer."""

    name: str
    markup: tuple[str, ...]

    def words(self) -> list[str]: ...

    def encode(self, conversations: Any, tokenizer: Any, where: str) -> Any: ...


CONTRACTS: dict[str, type] = {
    "encoder": Encoder,
    "pooler": Pooler,
    "connector": Connector,
    "decoder": Decoder,
    "mixer": Mixer,
    "ffn": FFN,
    "dataset": Dataset,
    "template": Template,
}

# Constructor arguments the toolkit fills in from neighbouring parts: users never write them.
DERIVED: dict[str, tuple[str, ...]] = {
    "encoder": (),
    "pooler": ("grid", "n_tokens"),
    "connector": ("in_dim", "out_dim", "grid"),
    "mixer": ("d_model", "layer_idx"),
    "ffn": ("d_model", "layer_idx"),
    "decoder": (),
    "dataset": ("image_size",),
    "template": (),
}

# Members the toolkit uses when a part has them.
OPTIONAL: dict[str, dict[str, str]] = {
    "encoder": {
        "shard_units": "sub-modules FSDP wraps (and checkpoints) one by one, e.g. the ViT blocks",
        "data_config": "timm data config (input_size, interpolation, mean, crop_pct): the data path's "
        "preprocessing (data.preprocess); without it, a bicubic resize and a black letterbox",
    },
    "connector": {"num_tokens": "tokens per image it outputs, when it reduces them itself (C-Abstractor)"},
    "decoder": {
        "aux_loss": "aux_loss() -> Tensor | None: added to the loss after each forward (MoE load balancing)",
        "layer_pattern": "per-layer pattern letters, shown by `chimera describe`",
        "pattern": "the resolved pattern string, shown by `chimera describe` and logged",
        "shard_units": "sub-modules FSDP wraps one by one (the layers)",
    },
    "mixer": {
        "flops_per_token": "flops_per_token(seq_len) -> float: sequence-dependent forward FLOPs per token "
        "(attention scores), counted in MFU",
        "shard_unit": "class attribute: FSDP wraps the module on its own",
    },
    "ffn": {"aux_loss": "attribute set in forward: this layer's auxiliary loss (summed by the decoder)"},
    "dataset": {"vocabulary": "classmethod listing the words it can emit (for the offline word tokenizer)"},
}


def required_members(contract: type) -> list[str]:
    """The attributes and methods a Protocol declares, in declaration order."""
    names = list(getattr(contract, "__annotations__", {}))
    names += [n for n, v in vars(contract).items() if callable(v) and (not n.startswith("_") or n in _DUNDER)]
    return names


_DUNDER = ("__len__", "__getitem__")


def _implements(obj: Any, member: str) -> bool:
    if not hasattr(obj, member):
        return False
    if member == "forward":  # nn.Module.forward exists on every module and only raises
        from torch import nn

        return not isinstance(obj, nn.Module) or type(obj).forward is not nn.Module.forward
    return True


def check(kind: str, obj: Any, name: str) -> None:
    """Raise a ``ChimeraError`` naming the plugin, the missing members and the contract, if any are missing."""
    contract = CONTRACTS.get(kind)
    if contract is None:
        return
    missing = [m for m in required_members(contract) if not _implements(obj, m)]
    if missing:
        cls = type(obj)
        raise ChimeraError(
            f"{kind} '{name}' ({cls.__module__}.{cls.__qualname__}) does not meet the {contract.__name__} "
            f"contract: missing {', '.join(missing)} (see toolkit/contracts.py)"
        )
