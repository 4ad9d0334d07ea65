"""The component registry: kinds, ``@register``, ``build()``, entry points and plugin modules.

Every component (encoder, pooler, connector, mixer, ffn, decoder, dataset, template) registers itself with a decorator
placed next to its class, as timm's ``@register_model`` does. The registry holds only tables and lookups;
``build`` turns a config node ``{name: ..., **kwargs}`` into an object after checking every key against the
constructor's signature, so a typo fails before anything heavy is built.

Discovery: the entry-point group ``chimera.components`` (the built-ins use it too, so the third-party path is
exercised on every run) and the ``plugins:`` list of a YAML file (any importable module).
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from toolkit.contracts import CONTRACTS, DERIVED
from toolkit.errors import ChimeraError, did_you_mean

KINDS = tuple(CONTRACTS)  # one contract per kind: toolkit/contracts.py says what each part must provide
ENTRY_POINT_GROUP = "chimera.components"

_MISSING = inspect.Parameter.empty


@dataclass(frozen=True)
class Param:
    """One constructor argument as users see it in YAML."""

    name: str
    default: Any = _MISSING
    annotation: str = ""

    @property
    def required(self) -> bool:
        return self.default is _MISSING


@dataclass
class Entry:
    """A registered component: its builder plus the metadata the toolkit reads (symbol, summary)."""

    kind: str
    name: str
    target: Callable[..., Any]
    symbol: str | None = None  # letter in a decoder layer pattern (mixers and ffns only)
    aliases: tuple[str, ...] = ()
    module: str = ""

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.target) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""

    def params(self) -> list[Param]:
        """Constructor arguments users may set (``self``, ``*args`` and ``**kwargs`` excluded)."""
        sig = inspect.signature(self.target)
        out = []
        for p in sig.parameters.values():
            if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            ann = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
            out.append(Param(p.name, p.default, "" if ann is _MISSING else str(ann)))
        return out

    def type_hints(self) -> dict[str, Any]:
        """Evaluated constructor annotations (empty when they cannot be evaluated)."""
        import typing

        target = self.target.__init__ if inspect.isclass(self.target) else self.target
        try:
            return typing.get_type_hints(target)
        except Exception:  # an annotation naming something unimportable: skip the type check
            return {}

    def accepts_var_kwargs(self) -> bool:
        return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(self.target).parameters.values())


_REGISTRY: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
_ALIASES: dict[str, dict[str, str]] = {kind: {} for kind in KINDS}
_discovered = False


def _check_kind(kind: str) -> None:
    if kind not in _REGISTRY:
        raise ChimeraError(
            f"unknown component kind '{kind}'{did_you_mean(kind, KINDS)}; kinds: {', '.join(KINDS)}"
        )


def register(
    kind: str, name: str, *, symbol: str | None = None, aliases: Iterable[str] = ()
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a component class (or builder function) under ``kind``/``name``.

    ``symbol`` is the one-character letter a mixer or ffn takes in a decoder layer pattern. ``aliases`` are
    old names that still resolve, with a warning. A second registration of the same name fails.
    """
    _check_kind(kind)
    if symbol is not None and (len(symbol) != 1 or kind not in ("mixer", "ffn")):
        raise ValueError(f"symbol must be one character and only for mixers/ffns, got {symbol!r} for {kind}")

    def decorator(target: Callable[..., Any]) -> Callable[..., Any]:
        existing = _REGISTRY[kind].get(name)
        if existing is not None and not _same_object(existing.target, target):
            raise ChimeraError(
                f"{kind} '{name}' is registered twice: by {existing.module}.{existing.target.__qualname__} "
                f"and by {target.__module__}.{target.__qualname__}; rename one of them"
            )
        if symbol is not None:
            for other in _symbol_table().values():
                if other.symbol == symbol and other.name != name:
                    raise ChimeraError(
                        f"pattern symbol '{symbol}' of {kind} '{name}' is already taken by "
                        f"{other.kind} '{other.name}'; choose another letter"
                    )
        entry = Entry(kind, name, target, symbol, tuple(aliases), target.__module__)
        _REGISTRY[kind][name] = entry
        for alias in aliases:
            _ALIASES[kind][alias] = name
        return target

    return decorator


def _same_object(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    """A module imported twice (e.g. reloaded) re-registers the 'same' class; that is not a clash."""
    return a is b or (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def _symbol_table() -> dict[str, Entry]:
    return {e.symbol: e for kind in ("mixer", "ffn") for e in _REGISTRY[kind].values() if e.symbol}


def discover() -> None:
    """Import every module advertised under the ``chimera.components`` entry-point group (once)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except ChimeraError:
            raise
        except Exception as exc:  # a broken third-party plugin must not take the built-ins down with it
            warnings.warn(f"chimera plugin '{ep.name}' ({ep.value}) failed to load: {exc!r}", stacklevel=2)


def import_plugins(modules: Iterable[str], where: str = "plugins", search: Iterable[str] = ()) -> None:
    """Import the modules of a YAML ``plugins:`` list so that their components register themselves.

    Importing a plugin runs its code, as any Python import does: list only modules you trust. Besides
    ``sys.path``, modules are looked up in ``search`` (the experiment file's folder, then the working
    directory), as ``python`` finds a module next to the script it runs.
    """
    import os
    import sys

    modules = [str(m) for m in modules]
    if modules:
        for folder in search:
            folder = os.path.abspath(folder)
            if folder not in sys.path:
                sys.path.append(folder)
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            looked = ", ".join(os.path.abspath(f) for f in search)
            raise ChimeraError(
                f"{where}: cannot import plugin module '{module}': {exc}"
                + (f" (also looked in {looked})" if looked else "")
            ) from exc


def names(kind: str) -> list[str]:
    discover()
    _check_kind(kind)
    return sorted(_REGISTRY[kind])


def entries(kind: str | None = None) -> list[Entry]:
    discover()
    kinds = KINDS if kind is None else (kind,)
    for k in kinds:
        _check_kind(k)
    return [_REGISTRY[k][n] for k in kinds for n in sorted(_REGISTRY[k])]


def get(kind: str, name: str, where: str = "") -> Entry:
    """The entry for ``kind``/``name``; unknown names fail with the list of registered ones."""
    discover()
    _check_kind(kind)
    if name in _ALIASES[kind]:
        new = _ALIASES[kind][name]
        warnings.warn(f"{kind} '{name}' was renamed to '{new}'; update your config", stacklevel=2)
        name = new
    if name not in _REGISTRY[kind]:
        prefix = f"{where}: " if where else ""
        known = ", ".join(sorted(_REGISTRY[kind])) or "none"
        raise ChimeraError(
            f"{prefix}unknown {kind} '{name}'{did_you_mean(name, _REGISTRY[kind])}; registered: {known}",
            key=where or None,
        )
    return _REGISTRY[kind][name]


def by_symbol(symbol: str) -> Entry | None:
    """The mixer or ffn whose pattern letter is ``symbol``."""
    discover()
    return _symbol_table().get(symbol)


def symbols() -> dict[str, Entry]:
    discover()
    return dict(sorted(_symbol_table().items()))


def split_node(node: Mapping[str, Any] | str, kind: str, where: str) -> tuple[str, dict[str, Any]]:
    """``{name: x, **kwargs}`` (or the bare string ``x``) -> ``(x, kwargs)`` with plain Python values."""
    node = _plain(node)
    if isinstance(node, str):
        return node, {}
    if not isinstance(node, Mapping):
        raise ChimeraError(f"{where}: expected a mapping with 'name:' selecting a {kind}, got {node!r}")
    if "name" not in node or not node["name"]:
        raise ChimeraError(
            f"{where}: missing 'name:' selecting a {kind}; registered: {', '.join(names(kind))}", key=where
        )
    kwargs = {k: v for k, v in node.items() if k != "name"}
    return str(node["name"]), kwargs


def validate(
    kind: str, node: Mapping[str, Any] | str, where: str, derived: Iterable[str] | None = None
) -> tuple[Entry, dict[str, Any]]:
    """Check a config node against the constructor signature without building anything.

    ``derived`` names arguments the toolkit fills in (widths, grids, vocab): a user writing one of them is
    told where it comes from, so no width is ever written twice.
    """
    name, kwargs = split_node(node, kind, where)
    entry = get(kind, name, f"{where}.name")
    params = {p.name: p for p in entry.params()}
    derived = set(DERIVED[kind] if derived is None else derived)
    for key in kwargs:
        if key in derived:
            raise ChimeraError(
                f"{where}.{key}: is derived by Chimera for {kind} '{name}' (from the neighbouring components); "
                "remove it from the config",
                key=f"{where}.{key}",
            )
        if key not in params and not entry.accepts_var_kwargs():
            accepted = ", ".join(p for p in params if p not in derived) or "none"
            raise ChimeraError(
                f"{where}.{key}: unknown argument for {kind} '{name}'{did_you_mean(key, params)}; accepted: {accepted}",
                key=f"{where}.{key}",
            )
    missing = [
        p.name for p in params.values() if p.required and p.name not in kwargs and p.name not in derived
    ]
    if missing:
        raise ChimeraError(f"{where}: {kind} '{name}' needs {', '.join(missing)}", key=where)
    hints = entry.type_hints()
    for key, value in kwargs.items():
        if key in hints and not matches(value, hints[key]):
            raise ChimeraError(
                f"{where}.{key}: expected {type_name(hints[key])} for {kind} '{name}', got {value!r:.60} "
                f"({type(value).__name__})",
                key=f"{where}.{key}",
            )
    check = getattr(entry.target, "validate_config", None)
    if check is not None:  # component-specific config-time checks (e.g. a decoder's layer pattern)
        check(kwargs, where)
    return entry, kwargs


def build(kind: str, node: Mapping[str, Any] | str, where: str = "", **derived: Any) -> Any:
    """Validate ``node`` and construct the component, passing ``derived`` values (widths, grids) along."""
    where = where or kind
    entry, kwargs = validate(kind, node, where, derived=derived)
    params = {p.name for p in entry.params()}
    accepted_derived = {k: v for k, v in derived.items() if k in params or entry.accepts_var_kwargs()}
    try:
        obj = entry.target(**kwargs, **accepted_derived)
    except ChimeraError as exc:
        if exc.key is not None:
            raise
        raise ChimeraError(str(exc), key=where) from exc
    except (ValueError, TypeError) as exc:
        if isinstance(exc, TypeError) and "argument" not in str(exc):
            raise
        raise ChimeraError(
            f"{where}: {kind} '{entry.name}' rejected its arguments: {exc}", key=where
        ) from exc
    from toolkit.contracts import check

    check(kind, obj, entry.name)
    return obj


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain Python, so components never see a DictConfig."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a hard dependency
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def matches(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a constructor annotation (int, float, bool, str, None, unions, Literal,
    list/tuple/dict of those); annotations it does not know (tensors, modules, Any) accept anything."""
    import types
    import typing

    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    from collections.abc import Mapping as AbcMapping
    from collections.abc import Sequence as AbcSequence

    if origin in (list, tuple, AbcSequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(matches(v, a) for v, a in zip(value, args))
        inner = args[0] if args else Any
        return all(matches(v, inner) for v in value)
    if origin in (dict, AbcMapping) or hint is dict:
        if not isinstance(value, Mapping):
            return False
        if len(args) == 2:
            return all(matches(k, args[0]) and matches(v, args[1]) for k, v in value.items())
        return True
    return True


def type_name(hint: Any) -> str:
    """``int | None`` style text for an annotation."""
    import typing

    text = str(hint) if typing.get_origin(hint) else getattr(hint, "__name__", str(hint))
    return text.replace("typing.", "").replace("NoneType", "None")
