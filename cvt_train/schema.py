"""The machinery under cvt_train/config.py's schema, kept apart so that the model and data modules, which declare
their own dataclasses (ModelConfig, StageConfig, AugConfig), use it without importing the whole config: fields with
their rules in metadata, the one-line messages built from them, values checked against them, and stored
checkpoint configs turned into plain data that OmegaConf never resolves.

A field's metadata says what the types cannot: the range (`ge`, `gt`, `lt`, `le`; `item_ge`... for a list's
items, `length` for its length), the allowed values (`choices`, with `what` naming them), a phrase for what to give
(`expected`) and a `hint`. OmegaConf refuses wrong types and unknown keys itself (`typed`); `check_values` adds the
rest, and `expected_text` words both alike.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import field
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from .errors import UserError


def rule(default: Any = MISSING, **meta: Any) -> Any:
    """A field with a range / choices / hint in its metadata; a list default is copied per instance."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# OmegaConf's grammar (omegaconf/grammar, `ESC_INTER` / `TOP_ESC`): before `${`, 2n+1 backslashes read as n
# backslashes and a literal `${`, but 2n backslashes read as n backslashes followed by a LIVE interpolation.
# Backslashes anywhere else are literal. So a run of k backslashes before `${` is written as 2k+1.
_BACKSLASHES_BEFORE_INTERPOLATION = re.compile(r"(\\*)\$\{")


def escape_interpolations(text: str) -> str:
    """`text` as an OmegaConf string value that reads back as exactly `text`: no interpolation, no resolver."""
    return _BACKSLASHES_BEFORE_INTERPOLATION.sub(lambda m: m.group(1) * 2 + "\\${", text)


def _holds_interpolation(tree: Any) -> bool:
    from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser

    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, OmegaConfGrammarParser.InterpolationContext):
            return True
        stack.extend(node.getChild(i) for i in range(node.getChildCount()))
    return False


def _inert_string(text: str) -> str:
    """escape_interpolations(text), checked with OmegaConf's own parser: a string that would still hold a live
    interpolation (an OmegaConf whose grammar changed) is refused rather than resolved."""
    escaped = escape_interpolations(text)
    if "${" not in escaped:  # OmegaConf parses only strings that contain `${`: the others are plain text
        return escaped
    from omegaconf.errors import GrammarParseError
    from omegaconf.grammar_parser import parse

    try:
        live = _holds_interpolation(parse(escaped))
    except GrammarParseError:  # OmegaConf could not read it back as text either
        live = True
    if live:
        raise UserError(
            f"checkpoint config holds the string {text[:80]!r}, which could not be made inert "
            "(plain text) for OmegaConf; refusing it"
        )
    return escaped


def as_plain_data(value: Any) -> Any:
    """A stored config as inert data for OmegaConf: every string reads back as exactly the stored text (`${`,
    with or without backslashes before it, is escaped), so OmegaConf never resolves anything from it. Anything
    but dicts, lists, strings, numbers, booleans and None is refused."""
    if isinstance(value, dict):
        return {str(k): as_plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_plain_data(v) for v in value]
    if isinstance(value, str):
        return _inert_string(value)
    if value is None or isinstance(value, (int, float, bool)):
        return value
    raise UserError(f"checkpoint config holds a {type(value).__name__}, not plain data; refusing it")


# ------------------------------------------------------------------------------------------ reading the schema
def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(the type inside `X | None` or Optional[X], whether None is allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else Any), True
    return tp, False


def key_parts(full_key: str) -> list[str]:
    """`model.stages[0].depth` (OmegaConf's spelling) -> ['model', 'stages', '0', 'depth']."""
    return [p for p in re.split(r"[.\[\]]+", str(full_key)) if p]


def display_key(full_key: str) -> str:
    """The key as written on the command line: `model.stages.0.depth`."""
    return ".".join(key_parts(full_key))


def lookup(schema: type, full_key: str) -> tuple[dataclasses.Field, Any] | None:
    """(field, its type) of `full_key` in the dataclass `schema`; list indices pass through to the item type and
    a list item's own key (`optim.betas[1]`) stands for the list. None where the key is not in the schema."""
    cls, found = schema, None
    for part in key_parts(full_key):
        if found is not None:
            inner = _unwrap(found[1])[0]
            if typing.get_origin(inner) is list and part.isdigit():
                item = typing.get_args(inner)[0] if typing.get_args(inner) else Any
                if dataclasses.is_dataclass(item):
                    cls, found = item, None
                continue  # an item of a list of scalars: the list's field stands for it
            inner_cls = inner if dataclasses.is_dataclass(inner) else None
            if inner_cls is None:
                return None
            cls = inner_cls
        if cls is None or not dataclasses.is_dataclass(cls):
            return None
        fld = {f.name: f for f in dataclasses.fields(cls)}.get(part)
        if fld is None:
            return None
        found = (fld, _hints(cls)[part])
    return found


def _num(x: Any) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def expected_text(fld: dataclasses.Field, tp: Any) -> str:
    """What a field takes, in words: 'an integer >= 1', 'a number in [0, 1) or null (hint)', 'true or false'."""
    meta = fld.metadata
    inner, nullable = _unwrap(tp)
    if "expected" in meta:
        what = meta["expected"]
    elif "choices" in meta:
        what = "one of " + ", ".join("null" if c is None else str(c) for c in meta["choices"])
        nullable = False
    elif inner is bool:
        what = "true or false"
    elif inner in (int, float):
        what = "an integer" if inner is int else "a number"
        lo = ("[", meta["ge"]) if "ge" in meta else ("(", meta["gt"]) if "gt" in meta else None
        hi = (")", meta["lt"]) if "lt" in meta else ("]", meta["le"]) if "le" in meta else None
        if lo and hi:
            what = f"{what} in {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"
        elif lo:
            what = f"{what} {'>=' if lo[0] == '[' else '>'} {_num(lo[1])}"
        elif hi:
            what = f"{what} {'<' if hi[0] == ')' else '<='} {_num(hi[1])}"
    elif inner is str:
        what = "a string"
    elif typing.get_origin(inner) is list:
        what = "a list"
    elif dataclasses.is_dataclass(inner):
        what = "a mapping of its keys"
    else:
        what = "a value"
    what += " or null" if nullable else ""
    return what + (f" ({meta['hint']})" if "hint" in meta else "")


def shown(value: Any) -> str:
    """A value as the messages show it: 'abc' quoted, numbers and lists as written (1, not the 1.0 that a float
    key stores for it)."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=False)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return repr(value)


def type_error_message(schema: type, full_key: str, value: Any, prefix: str = "") -> str | None:
    """One line for a value of the wrong type at `full_key` (OmegaConf's ValidationError), from the schema; None
    where the key is not in the schema."""
    found = lookup(schema, full_key)
    if found is None:
        return None
    key = display_key(f"{prefix}{full_key}")
    parts = key_parts(key)
    fld, tp = found
    if (
        parts
        and parts[-1].isdigit()
        and parts[-1] != fld.name
        and typing.get_origin(_unwrap(tp)[0]) is list
        and not dataclasses.is_dataclass((typing.get_args(_unwrap(tp)[0]) or [None])[0])
    ):
        key = ".".join(parts[:-1])  # optim.betas.1 -> optim.betas: the list is what the user gives
    return f"{key}={shown(value)}: expected {expected_text(fld, tp)}"


# ------------------------------------------------------------------------------------------------ the checks
def schema_error(e: OmegaConfBaseException, schema: type, prefix: str = "") -> UserError:
    """OmegaConf's error from merging values onto `schema` (a wrong type, an unknown key) as one UserError line;
    `prefix` is where the schema sits in the app's config (`model.`)."""
    full_key = str(getattr(e, "full_key", "") or "")
    key = display_key(f"{prefix}{full_key}")
    if isinstance(e, ValidationError) and full_key:
        message = type_error_message(schema, full_key, getattr(e, "value", None), prefix)
        if message:
            return UserError(message)
    if isinstance(e, (ConfigKeyError, ConfigAttributeError)) and full_key:
        cls = _class_at(schema, key_parts(full_key)[:-1])
        known = f"; known keys: {', '.join(sorted(f.name for f in dataclasses.fields(cls)))}" if cls else ""
        return UserError(f"{key}: unknown key{known}")
    return UserError(f"{key or prefix.rstrip('.')}: {' '.join(str(e).split())}")


def _item_class(tp: Any) -> type | None:
    """The dataclass a field of type `tp` holds, itself or as a list's items; None for scalars."""
    inner = _unwrap(tp)[0]
    if typing.get_origin(inner) is list:
        inner = (typing.get_args(inner) or [None])[0]
    return inner if dataclasses.is_dataclass(inner) else None


def _class_at(schema: type, parts: list[str]) -> type | None:
    """The dataclass of the section at `parts` (`['model', 'stages', '0']` -> StageConfig); None if there is none."""
    cls = schema
    for part in parts:
        if not part.isdigit():  # a list index keeps the list's item class
            tp = _hints(cls).get(part) if cls else None
            cls = _item_class(tp) if tp is not None else None
    return cls


def typed(node: Any, schema: type, prefix: str, keep_unknown: bool = False) -> DictConfig:
    """`node` (a dict or DictConfig, possibly a stored checkpoint config) merged onto `schema`: absent keys take the
    schema's defaults; a wrong type or (unless keep_unknown) an unknown key is one UserError line. With keep_unknown,
    keys the schema lacks are left out (a stored config's extra keys stay plain data)."""
    if OmegaConf.is_config(node):
        node = OmegaConf.to_container(node, resolve=True)
    node = as_plain_data(dict(node or {}))  # every string reads back as its text: nothing in it is resolved later
    if keep_unknown:
        known = {f.name for f in dataclasses.fields(schema)}
        node = {k: v for k, v in node.items() if k in known}
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), node)
    except OmegaConfBaseException as e:
        raise schema_error(e, schema, prefix) from e


def _in_range(x: Any, meta: Mapping, pre: str = "") -> bool:
    """x within the bounds `ge`/`gt`/`lt`/`le` of `meta` (with `pre`: `item_ge`... for a list's items); NaN fails."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return True  # (the schema's types already refused what is not a number)
    bounds = {"ge": x.__ge__, "gt": x.__gt__, "lt": x.__lt__, "le": x.__le__}
    return x == x and all(test(meta[pre + name]) for name, test in bounds.items() if pre + name in meta)


def check_values(node: DictConfig, schema: type, prefix: str, only: set[str] | None = None) -> None:
    """What a field's metadata declares beyond its type (range, choices, list length and item range) and `???`
    values left unset, for one typed section (its fields named in `only`, if given); one UserError line naming the
    first key that breaks one."""
    hints = _hints(schema)
    for f in dataclasses.fields(schema):
        if only is not None and f.name not in only:
            continue
        key, meta, tp = f"{prefix}{f.name}", f.metadata, hints[f.name]
        if OmegaConf.is_missing(node, f.name):
            raise UserError(f"{key} is not set; set {key}=<{expected_text(f, tp).removesuffix(' or null')}>")
        value = node[f.name]
        if value is None:
            continue
        if dataclasses.is_dataclass(_unwrap(tp)[0]):
            check_values(value, _unwrap(tp)[0], key + ".")
        elif "choices" in meta:
            if value not in meta["choices"]:
                names = [c for c in meta["choices"] if c is not None]
                chooser = prefix.rstrip(".") if f.name == "name" else key  # optim.name is chosen as optim=...
                raise UserError(
                    f"{key}={shown(value)}: unknown {meta.get('what', 'value')}; choose one of "
                    f"{', '.join(names)} (e.g. {chooser}={names[0]})"
                )
        elif OmegaConf.is_list(value):
            if len(value) != meta.get("length", len(value)) or not all(_in_range(x, meta, "item_") for x in value):
                raise UserError(f"{key}={shown(value)}: expected {expected_text(f, tp)}")
        elif not _in_range(value, meta):
            raise UserError(f"{key}={shown(value)}: expected {expected_text(f, tp)}")
