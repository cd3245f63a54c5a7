"""Settings defined once: a dataclass field carries its help, choices and flag metavar; from the
dataclass this module makes the command-line flags, reads YAML files and merges

    dataclass defaults < --config FILE.yaml < command-line flags

for both stages (`cache_teacher.config.CacheConfig`, `train_student.config.TrainConfig` and its
`Stage`). Declare a setting with `setting(...)`:

    @dataclass
    class Config:
        k: int = setting(64, help="top-k entries stored per position", group="teacher")
        mode: str = setting("score", help="score or generate", choices=("score", "generate"))
        sources: list[str] | None = setting(None, help="keep only these sources", metavar="A,B,...")

The flag is the name with - for _ (`--max-length`), typed by the annotation: int and float parse
as such, bool is `--x/--no-x`, a list takes comma-separated values and may be repeated
(`--cache a --cache b` = `--cache a,b`; in YAML a list or a comma-separated string). `group=`
starts a `--help` section that the following fields stay in. YAML keys are the field names; an
unknown key is an error naming the file and the known keys; values are converted to the field's type
(PyYAML reads `1e-5` as a string) or rejected, naming the file and key. A list of a nested dataclass
(`stages: list[Stage]`) takes mappings of that dataclass's settings.

Standard library only (YAML is imported when a file is read): `kdcache --help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

from formats.errors import InputError

_FLAG = "flag"


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    choices: tuple | None = None,
    metavar: str | None = None,
    group: str | None = None,
    flag: bool = True,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field that is also a YAML key and (unless flag=False) a command-line flag."""
    metadata = {"help": help, "choices": choices, "metavar": metavar, "group": group, _FLAG: flag}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# --- command line ---------------------------------------------------------------------------------


def add_flags(parser: argparse.ArgumentParser, *classes: type) -> None:
    """`--config FILE.yaml` and one flag per setting of `classes` (fields with flag=False left out).

    Every flag defaults to None, so that an absent flag leaves the value to the file or the default."""
    parser.add_argument(
        "--config",
        metavar="FILE.yaml",
        default=None,
        help="YAML file of settings (keys: the long option names with _ for -); flags override it",
    )
    for cls in classes:
        hints = _settings((cls,))
        group: Any = parser
        for f in dataclasses.fields(cls):
            if f.metadata.get("group"):
                group = parser.add_argument_group(f.metadata["group"])
            if f.metadata.get(_FLAG, False):
                group.add_argument(
                    "--" + f.name.replace("_", "-"),
                    dest=f.name,
                    default=None,
                    help=_help(f),
                    **_flag_kwargs(f, hints[f.name]),
                )


def flags_given(args: argparse.Namespace, *classes: type) -> dict[str, Any]:
    """The settings of `classes` that were given as flags (not None) in parsed `args`."""
    names = [f.name for cls in classes for f in dataclasses.fields(cls) if f.metadata.get(_FLAG, False)]
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _flag_kwargs(f: dataclasses.Field, hint: Any) -> dict[str, Any]:
    kind, _ = _kind(hint)
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    kwargs: dict[str, Any] = {"metavar": f.metadata.get("metavar")}
    if f.metadata.get("choices"):
        kwargs["choices"] = f.metadata["choices"]
    if kind is list:
        kwargs["action"] = _ExtendSplit
    elif kind in (int, float):
        kwargs["type"] = kind
    return {k: v for k, v in kwargs.items() if v is not None}


def _help(f: dataclasses.Field) -> str:
    """The field's help with its default; % escaped (argparse %-formats help strings)."""
    text, default = f.metadata["help"].replace("%", "%%"), f.default
    if default is dataclasses.MISSING or default is None:  # None, or a list (default_factory)
        return text
    return f"{text} (default: {('on' if default else 'off') if isinstance(default, bool) else default})"


class _ExtendSplit(argparse.Action):
    """A list flag: comma-separated values, and the flag may be repeated (the values add up)."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest, None) or [])
        setattr(namespace, self.dest, items + [v for v in values.split(",") if v])


# --- YAML and the merge ---------------------------------------------------------------------------


def merge(classes: tuple[type, ...], config_file: str | Path | None, flags: dict[str, Any]) -> dict[str, Any]:
    """The values given: those of the YAML file, overridden by `flags` that are not None, checked
    against the settings of `classes` and converted to their types. Defaults stay the dataclass's."""
    hints = _settings(classes)
    values: dict[str, Any] = {}
    if config_file:
        where = f"config file {config_file}"
        values.update(convert(read_yaml(config_file), hints, where))
    values.update(convert({k: v for k, v in flags.items() if v is not None}, hints, "flags"))
    return values


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file; InputError when it is missing, not YAML, or not a mapping."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise InputError(f"config file {p} does not exist (or is not a file)")
    try:
        data = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"config file {p} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"config file {p} must hold a mapping of setting: value, got {type(data).__name__}")
    return data


def convert(values: dict[str, Any], hints: dict[str, Any], where: str) -> dict[str, Any]:
    """`values` converted to the types in `hints` (setting name -> annotation); InputError naming
    `where` and the key for an unknown setting or a value that is not of its type."""
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise InputError(f"{where}: unknown settings {', '.join(map(str, unknown))}; known: {', '.join(sorted(hints))}")
    return {name: _value(value, hints[name], where, name) for name, value in values.items()}


def check_choices(obj: Any, where: str = "") -> None:
    """InputError for a setting of dataclass `obj` whose value is not one of its choices."""
    for f in dataclasses.fields(obj):
        allowed, value = f.metadata.get("choices"), getattr(obj, f.name)
        if allowed and value is not None and value not in allowed:
            raise InputError(f"{where}{f.name}={value!r} is not one of {', '.join(allowed)}")


def _settings(classes: tuple[type, ...]) -> dict[str, Any]:
    hints: dict[str, Any] = {}
    for cls in classes:
        own = typing.get_type_hints(cls)
        hints.update({f.name: own[f.name] for f in dataclasses.fields(cls)})
    return hints


def _kind(hint: Any) -> tuple[Any, Any]:
    """(int | float | str | bool | list | a dataclass, the list's item type or None), None stripped."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return _kind(args[0])
    if typing.get_origin(hint) is list:
        return list, args[0]
    return hint, None


def _value(value: Any, hint: Any, where: str, key: str) -> Any:
    if value is None:
        if type(None) in typing.get_args(hint):
            return None
        raise InputError(f"{where}: {key}: must be set (got null)")
    kind, item = _kind(hint)
    if kind is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{where}: {key}: expected a list (or comma-separated values), got {value!r}")
        return [_value(v, item, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(kind):
        if isinstance(value, kind):
            return value
        if not isinstance(value, dict):
            raise InputError(f"{where}: {key}: expected a mapping of {kind.__name__} settings, got {value!r}")
        return kind(**convert(value, _settings((kind,)), f"{where}, {key}"))
    return _scalar(value, kind, f"{where}: {key}")


def _scalar(value: Any, kind: type, where: str) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind in (int, float) and not isinstance(value, bool):
        if isinstance(value, int) or (kind is float and isinstance(value, float)):
            return kind(value)
        if isinstance(value, str):
            try:
                return kind(value)
            except ValueError:
                pass
    elif kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise InputError(f"{where}: expected {_NAMES.get(kind, kind)}, got {value!r}")


_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
