"""One config system for both CLIs: typed dataclasses -> ``--help`` -> YAML presets -> overrides -> resolved file.

A config is a (possibly nested) dataclass. Each field's documentation is the string literal written right
under it (an attribute docstring, as in litgpt/torchtitan); ``build_parser`` turns those into ``--help``.
Precedence, lowest to highest: dataclass defaults < ``--config jobs/x.yaml`` < command-line flags.
Nested fields are addressed with dots (``--optim.lr 1e-3``) both on the command line and, as nested
mappings, in YAML. ``write_resolved`` writes the final config next to an output before work starts.

Only the standard library and PyYAML are imported here: both halves read this module.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from visalign.errors import VisalignError

T = TypeVar("T")

_MISSING = object()


class ConfigError(VisalignError):
    """A preset or override that does not fit the config class (unknown key, wrong type)."""


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (and its bases): ``{field: doc}``."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(src).body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise ConfigError naming the field."""
    tp, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional or value is None:
            return None
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp in (int, float, str):
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return tp(value)
        if origin in (list, tuple):
            (item_tp, *_) = typing.get_args(tp) or (Any,)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v != ""]
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                value = [value]  # `layer: 28` in YAML is the one-item list [28]
            items = [_coerce(v, item_tp, where) if item_tp is not Any else v for v in value]
            return items if origin is list else tuple(items)
        if origin is dict or tp is dict:
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
        if typing.get_origin(tp) is typing.Literal:
            choices = typing.get_args(tp)
            if value not in choices:
                raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
            return value
    except ConfigError:
        raise
    except (TypeError, ValueError, json.JSONDecodeError) as err:
        raise ConfigError(f"{where}: cannot read {value!r} as {getattr(tp, '__name__', tp)}") from err
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build ``cls`` from a nested mapping; unknown keys are an error that lists the valid ones."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in {where or cls.__name__}; valid keys: {', '.join(names)}"
        )
    kwargs = {}
    missing = []
    for f in dataclasses.fields(cls):
        if (
            f.name not in data
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ):
            missing.append(f"--{where}.{f.name}" if where else f"--{f.name}")
    if missing:
        raise ConfigError(f"missing required setting(s): {', '.join(missing)}")
    for name in names:
        if name not in data:
            continue
        tp = hints[name]
        sub = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, data[name] or {}, sub)
        else:
            kwargs[name] = _coerce(data[name], tp, sub)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples -> lists) suitable for YAML/JSON."""
    out = dataclasses.asdict(cfg)

    def fix(x):
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [fix(v) for v in x]
        if isinstance(x, Path):
            return str(x)
        return x

    return fix(out)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (presets live under jobs/)")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}; fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def _flat_fields(cls: type, prefix: str = ""):
    """Yield ``(dotted_name, type, default, doc)`` for every leaf field of a nested dataclass."""
    docs = field_docs(cls)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from _flat_fields(tp, prefix=name + ".")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = _MISSING
        yield name, tp, default, docs.get(f.name, "")


def _type_label(tp: Any) -> str:
    tp, _ = _unwrap_optional(tp)
    if typing.get_origin(tp) is typing.Literal:
        return "{" + ",".join(map(str, typing.get_args(tp))) + "}"
    if typing.get_origin(tp) in (list, tuple):
        return "A,B,..."
    return getattr(tp, "__name__", str(tp)).upper()


def build_parser(cls: type, parser: argparse.ArgumentParser | None = None, **kw) -> argparse.ArgumentParser:
    """An argparse parser with one ``--dotted.name`` flag per leaf field, help from field docstrings.

    Flags default to a sentinel so that only the flags the user typed override the preset.
    Underscores may be written as dashes (``--top-k`` == ``--top_k``).
    """
    parser = parser or argparse.ArgumentParser(**kw)
    parser.add_argument(
        "--config", default=None, metavar="YAML", help="a preset (see jobs/); flags override it"
    )
    for name, tp, default, doc in _flat_fields(cls):
        flags = [f"--{name}"]
        if "_" in name:
            flags.append(f"--{name.replace('_', '-')}")
        shown = "required" if default is _MISSING else f"default: {default!r}"
        # a bare boolean flag (`--overwrite`) means true; `--overwrite false` still works
        is_bool = _unwrap_optional(tp)[0] is bool
        parser.add_argument(
            *flags,
            dest=name,
            default=argparse.SUPPRESS,
            metavar=_type_label(tp),
            help=f"{doc} ({shown})".replace("%", "%%"),
            **({"nargs": "?", "const": "true"} if is_bool else {}),
        )
    return parser


def resolve(cls: type[T], args: argparse.Namespace | dict[str, Any]) -> T:
    """Defaults < ``--config`` preset < flags, then type-checked into ``cls``."""
    given = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
    preset = given.pop("config", None)
    data: dict[str, Any] = load_yaml(preset) if preset else {}
    for dotted, value in given.items():
        if dotted.startswith("_"):
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return from_dict(cls, data)


def parse(cls: type[T], argv: list[str] | None = None, **kw) -> T:
    """Parse a command line straight into a config instance."""
    return resolve(cls, build_parser(cls, **kw).parse_args(argv))


def write_resolved(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config (YAML) before work starts, so every output says how it was made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"# resolved {type(cfg).__name__}, written by visalign before the run started\n")
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    return path
