"""Typed configs: dataclasses with one-line docs, YAML presets, `--set key=value` overrides.

A config class is a plain dataclass whose fields use `option(default, "why this default")`.
`build(ConfigClass, preset=..., file=..., overrides=..., **flags)` layers, lowest first:
dataclass defaults < preset YAML (`configs/<name>.yaml`, shipped in the wheel) < a user YAML
file < CLI flags < `--set` overrides. Unknown keys and wrong types are UserErrors that name
the key and suggest the nearest valid one; the resolved config is written back with
`save_yaml` so that rerunning it reproduces the run.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

from personalize.errors import UserError

T = TypeVar("T")
PRESET_PACKAGE = "personalize.configs"


def option(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field with a one-line doc (mutable defaults are copied per instance)."""
    metadata = {"help": help}
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


# Names users bring from diffusers' scripts, kohya's sd-scripts and peft, and the key they mean here.
COMMON_SPELLINGS = {
    "learning_rate": "lr",
    "unet_lr": "lr",
    "max_train_steps": "steps",
    "num_train_steps": "steps",
    "train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "network_dim": "rank",
    "lora_rank": "rank",
    "lora_r": "rank",
    "network_alpha": "alpha",
    "lora_alpha": "alpha",
    "output_dir": "output",
    "pretrained_model_name_or_path": "model",
    "instance_data_dir": "images",
    "train_data_dir": "images",
}


def nearest_name(name: str, choices: Iterable[str]) -> str | None:
    """The valid name closest to `name`, knowing the common spellings of other tools (learning_rate -> lr)."""
    choices = list(choices)
    spellings = {alias: key for alias, key in COMMON_SPELLINGS.items() if key in choices}
    match = difflib.get_close_matches(name, choices + list(spellings), n=1, cutoff=0.5)
    return spellings.get(match[0], match[0]) if match else None


def nearest(name: str, choices: Iterable[str], prefix: str = "") -> str:
    """' (did you mean X?)' or '' -- for error messages."""
    match = nearest_name(name, choices)
    return f" (did you mean '{prefix}{match}'?)" if match else ""


# --- presets ---------------------------------------------------------------------------------


def list_presets() -> list[str]:
    folder = resources.files(PRESET_PACKAGE)
    return sorted(item.name[: -len(".yaml")] for item in folder.iterdir() if item.name.endswith(".yaml"))


def read_preset(name: str) -> dict[str, Any]:
    presets = list_presets()
    if name not in presets:
        raise UserError(f"no preset named '{name}'{nearest(name, presets)}; presets: {', '.join(presets)}")
    text = resources.files(PRESET_PACKAGE).joinpath(f"{name}.yaml").read_text()
    return _parse_yaml(text, f"preset {name}")


def read_yaml_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    return _parse_yaml(path.read_text(), str(path))


def _parse_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UserError(f"{where} is not valid YAML: {str(error).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a mapping of key: value, not {type(data).__name__}")
    return data


# --- overrides -------------------------------------------------------------------------------


def parse_overrides(pairs: Iterable[str]) -> dict[str, Any]:
    """['lr=1e-4', 'data.flip=true'] -> {'lr': 1e-4, 'data': {'flip': True}} (values parsed as YAML)."""
    result: dict[str, Any] = {}
    for pair in pairs:
        key, separator, raw = pair.partition("=")
        if not separator or not key.strip():
            raise UserError(f"--set expects key=value, got '{pair}'")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        target = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = value
    return result


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `update` wins."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# --- typed construction ----------------------------------------------------------------------


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in arguments:
            return None
        errors = []
        for option_type in (arg for arg in arguments if arg is not type(None)):
            try:
                return _coerce(value, option_type, key)
            except UserError as error:
                errors.append(str(error))
        raise UserError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in arguments:
            choices = ", ".join(map(str, arguments))
            raise UserError(f"{key} must be one of {choices}, got {value!r}{nearest(str(value), map(str, arguments))}")
        return value
    if origin in (list, tuple):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key} must be a list, got {value!r}")
        inner = arguments[0] if arguments else Any
        return [_coerce(item, inner, f"{key}[{index}]") for index, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise UserError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, Mapping):
            raise UserError(f"{key} must be a mapping of its own keys, got {value!r}")
        return from_dict(annotation, value, prefix=f"{key}.")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{key} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{key} must be a whole number, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{key} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{key} must be text, got {value!r}")
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping; strict about keys and types."""
    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    hints = typing.get_type_hints(cls)
    unknown = [key for key in data if key not in fields]
    if unknown:
        key = unknown[0]
        raise UserError(f"unknown config key '{prefix}{key}'{nearest(key, fields, prefix)}")
    values = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    missing = [
        name
        for name, field in fields.items()
        if name not in values and field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    if missing:
        raise UserError(f"config key '{prefix}{missing[0]}' is required")
    return cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def build(
    cls: type[T],
    preset: str | None = None,
    file: str | Path | None = None,
    flags: Mapping[str, Any] | None = None,
    overrides: Iterable[str] = (),
    base: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> T:
    """defaults < base(merged layers) < preset < file < flags (None values skipped) < --set overrides;
    `base` sees what the other layers say (e.g. which model) and returns the layer beneath them."""
    data: dict[str, Any] = {}
    if preset:
        data = merge(data, read_preset(preset))
    if file:
        data = merge(data, read_yaml_file(file))
    if flags:
        data = merge(data, {key: value for key, value in flags.items() if value is not None})
    data = merge(data, parse_overrides(overrides))
    if base is not None:
        data = base(data)
    return from_dict(cls, data)


def dump_yaml(config: Any, header: str = "") -> str:
    text = yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True)
    return f"{header.rstrip()}\n{text}" if header else text


def save_yaml(config: Any, path: str | Path, header: str = "") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(dump_yaml(config, header))
    partial.replace(path)
    return path


def describe(cls: type) -> list[tuple[str, str, str]]:
    """(key, default, help) for every field: for `--help` texts and the README."""
    rows = []
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            default = repr(field.default)
        elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = repr(field.default_factory())  # type: ignore[misc]
        else:
            default = "(required)"
        rows.append((field.name, default, field.metadata.get("help", "")))
    return rows
