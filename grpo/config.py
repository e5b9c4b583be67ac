"""Configs from YAML files and `--set key=value` overrides, shared by every trainer config.

A YAML file may start from another one with `extends: other.yaml` (a path relative to the file);
its mappings are merged key by key, so a variant states only what differs from its parent.
Unknown keys are errors that list the close matches: a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import re
import types
import typing


def unknown_key_error(key: str, valid, where: str) -> ValueError:
    """A ValueError for an unknown `key` in `where`, naming the closest valid keys."""
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return ValueError(f"{where}: unknown key {key!r}; {hint}valid keys: {', '.join(valid)}")


def check_keys(values: dict, valid, where: str) -> None:
    for key in values:
        if key not in valid:
            raise unknown_key_error(str(key), valid, where)


def merge(base: dict, update: dict) -> dict:
    """A copy of `base` with `update` merged in: nested mappings key by key, anything else replaced."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_yaml(path: str) -> dict:
    """A YAML mapping, with `extends:` chains resolved (the child's keys win)."""
    import yaml

    with open(path) as f:
        values = yaml.safe_load(f)
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of keys to values, got {type(values).__name__}")
    parent = values.pop("extends", None)
    if parent is None:
        return values
    return merge(load_yaml(os.path.join(os.path.dirname(os.path.abspath(path)), parent)), values)


def save_yaml(values: dict, path: str) -> None:
    """`values` as a YAML file (keys in their order), e.g. a run's resolved config beside its checkpoints."""
    import yaml

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(values, f, sort_keys=False)


def field_docs(cls) -> dict[str, str]:
    """field -> its one-line doc: the comment after the field in the class's source, else the first sentence
    of a comment block of several lines just above it (a one-line comment above is a section heading).
    A field a subclass restates without a doc keeps its base class's."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass) and "__dataclass_fields__" in vars(klass):
            docs.update({name: doc for name, doc in _own_field_docs(klass).items() if doc or name not in docs})
    return docs


def _own_field_docs(cls) -> dict[str, str]:
    docs, above = {}, []
    for line in inspect.getsource(cls).splitlines()[1:]:
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("# "))
            continue
        match = re.match(r"(\w+): [^#]*?(?:#\s*(.*))?$", text) if line.startswith("    ") and not line.startswith("     ") else None
        if match and not text.startswith(("def ", "return")):
            docs[match.group(1)] = match.group(2) or (" ".join(above).split(". ")[0] if len(above) > 1 else "")
        above = []
    return docs


def parse_override(text: str) -> tuple[list[str], object]:
    """`"grpo.learning_rate=1e-6"` -> (["grpo", "learning_rate"], 1e-06); the value is a YAML scalar."""
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {text!r}: expected key=value (a dotted key for nested sections: grpo.beta=0.0)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ValueError(f"--set {text!r}: the value is not valid YAML: {error}") from error
    return key.strip().split("."), value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """A copy of `values` with each `key=value` override set (dotted keys reach into sections).

    The value replaces what was there, whole: `--set judge=null` removes a section's settings.
    """
    result = dict(values)
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for key in path[:-1]:
            node[key] = dict(node.get(key) or {})  # copies, so the caller's nested mappings stay untouched
            node = node[key]
        node[path[-1]] = value
    return result


def type_matches(value, hint) -> bool:
    """Whether `value` (read from YAML) fits the annotation `hint`: int, float (an int too), bool, str,
    list[...], tuple[...], dict, `X | None`; any other annotation accepts anything."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(type_matches(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint in (str, dict, list, tuple):
        return isinstance(value, hint)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(type_matches, value, args))
        return all(type_matches(item, args[0]) for item in value) if args else True
    if origin is dict:
        return isinstance(value, dict)
    return True


def type_text(hint) -> str:
    """An annotation as a reader writes it: `str | None`, `tuple[float, float]`."""
    return getattr(hint, "__name__", None) if isinstance(hint, type) else str(hint).replace("typing.", "")


class ConfigMixin:
    """`from_dict` / `from_yaml` for a config dataclass: unknown keys and values of the wrong type rejected
    (naming the key and `source`), YAML lists -> tuples."""

    @classmethod
    def from_dict(cls, values: dict, source: str = "config"):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        where = f"{source} ({cls.__name__})"
        check_keys(values, fields, where)
        converted = {}
        for key, value in values.items():
            # YAML has no tuples; a field whose default is a tuple (adam_betas) takes the list as one.
            if isinstance(value, list) and isinstance(fields[key].default, tuple):
                value = tuple(value)
            # YAML 1.1 reads 1e-6 (no dot) as a string; a float field takes it, or any int, as a number.
            takes_float = hints[key] is float or float in typing.get_args(hints[key])
            if takes_float and isinstance(value, (int, str)) and not isinstance(value, bool):
                try:
                    value = float(value)
                except ValueError:
                    raise ValueError(f"{where}: {key} must be a number, got {value!r}") from None
            # A lone name where a list is expected (report_to: wandb) is the config's own to accept.
            if not type_matches(value, hints[key]) and not (isinstance(value, str) and typing.get_origin(hints[key]) is list):
                raise ValueError(f"{where}: {key} must be {type_text(hints[key])}, got {value!r}")
            converted[key] = value
        try:
            return cls(**converted)
        except (ValueError, ImportError) as error:  # the checks of __post_init__, now naming the file
            raise type(error)(f"{where}: {error}") from None

    @classmethod
    def from_yaml(cls, path: str, **overrides):
        """Fields from a YAML file (a flat mapping of field names), then `overrides` on top."""
        return cls.from_dict({**load_yaml(path), **overrides}, source=path)
