"""Reading configs: YAML files and dotted command-line overrides, layered onto the typed configs of
``dlm_ray.config.schema``, and a job's command line (``--config FILE``, overrides, ``--help``).

Each layer lands on the one below it field by field: defaults <- YAML file <- overrides, validated
once at the end, with errors that name every bad field by its dotted path.

    cfg = load_config(PretrainConfig, "jobs/configs/tiny.yaml", ["--train.lr=3e-4"])
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml
from pydantic import ValidationError

from dlm_ray.config.schema import MODEL_PRESETS, Config, ModelConfig

C = TypeVar("C", bound=Config)


class ConfigError(ValueError):
    """A config file or override is wrong; the message says which key and why."""


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn ``["--train.lr=3e-4", "--model.preset", "small"]`` into a nested dict.

    Values are parsed as YAML scalars/collections, so ``3e-4``, ``true`` and ``[1, 2]`` keep their types.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"expected --key=value, got {arg!r}")
        key, sep, raw = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg!r} has no value")
            i += 1
            raw = args[i]
        if not key:
            raise ConfigError(f"empty key in override {arg!r}")
        value = _parse_value(raw)
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {arg!r} conflicts with an earlier value for {part!r}")
        node[parts[-1]] = value
        i += 1
    return out


def _parse_value(raw: str) -> Any:
    # PyYAML reads "3e-4" as a string (YAML 1.1 wants a dot); numbers first, then YAML.
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return yaml.safe_load(raw) if raw != "" else ""


def _section(cls: type[Config], key: str) -> type[Config] | None:
    """The config class of field ``key`` of ``cls`` if it is a nested section, else None."""
    field = cls.model_fields.get(key)
    ann = getattr(field, "annotation", None)
    return ann if isinstance(ann, type) and issubclass(ann, Config) else None


def merge(cls: type[Config], base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` laid over ``base``: nested sections merge field by field; any other value (a
    scalar, a list, a dict-valued field such as ``data.corpus.families``) is replaced whole."""
    merged = dict(base)
    for key, value in update.items():
        sub = _section(cls, key)
        if sub is not None and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(sub, merged[key], value)
        else:
            merged[key] = value
    return merged


def explicit_dict(cfg: Config) -> dict[str, Any]:
    """The settings that make ``cfg`` what it is: fields set explicitly (by a file, an override or a
    section's own default such as ``GenerateConfig.sample``'s 24/24/24), every nested section
    recursively. Validating it gives ``cfg`` back, and overrides merged into it change only the
    fields they name."""
    out: dict[str, Any] = {}
    for name in type(cfg).model_fields:
        value = getattr(cfg, name)
        if isinstance(value, Config):
            out[name] = explicit_dict(value)
        elif name in cfg.model_fields_set:
            out[name] = cfg.model_dump(mode="json", include={name})[name]
    if isinstance(cfg, ModelConfig) and cfg.preset is not None:
        # Fields the preset filled stay the preset's: changing the preset changes them too.
        preset = MODEL_PRESETS[cfg.preset]
        out = {k: v for k, v in out.items() if not (k in preset and preset[k] == v)}
    return out


def build_config(cls: type[C], data: dict[str, Any], *, source: str = "config") -> C:
    """Validate ``data`` as ``cls``; errors list every bad field with its dotted path."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {where}: {err['msg']}")
        raise ConfigError(f"invalid {source}:\n" + "\n".join(lines)) from None


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Defaults <- YAML file <- dotted overrides. Each layer lands on the one below it field by field:
    ``--sample.temperature=1`` changes that one field and keeps the file's (or the section's
    default) ``gen_length``, ``steps``, ... The result is validated once at the end."""
    data = explicit_dict(cls())
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        data, source = merge(cls, data, loaded), str(path)
    if overrides:
        data = merge(cls, data, parse_overrides(overrides))
        source += " + overrides"
    return build_config(cls, data, source=source)


def describe_fields(cfg: Config, prefix: str = "") -> list[str]:
    """``--section.field=value  (type)`` for every field, nested sections expanded: the ``--help``
    listing of a job."""
    lines = []
    for name, field in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        if isinstance(value, Config):
            lines += describe_fields(value, f"{prefix}{name}.")
            continue
        ann = field.annotation
        kind = ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "")
        shown = json.dumps(cfg.model_dump(mode="json", include={name})[name])
        lines.append(f"  --{prefix}{name}={shown}  ({kind})")
    return lines


def parse_job_args(cls: type[C], argv: list[str] | None, description: str,
                   extra: Callable[[argparse.ArgumentParser], None] | None = None) -> tuple[C, argparse.Namespace]:
    """A job's command line: ``--config FILE``, the job's own ``extra`` arguments, and dotted
    overrides of any config field. ``--help`` lists every field with its value after the file."""
    ap = argparse.ArgumentParser(description=description, add_help=False)
    ap.add_argument("--config", default=None, help="a YAML file of this job's config")
    ap.add_argument("-h", "--help", action="store_true")
    if extra is not None:
        extra(ap)
    args, overrides = ap.parse_known_args(argv)
    if args.help:
        ap.print_help()
        cfg = load_config(cls, args.config)
        print(f"\nconfig fields (override any with --name=value; values after {args.config or 'the defaults'}):")
        print("\n".join(describe_fields(cfg)))
        raise SystemExit(0)
    return load_config(cls, args.config, overrides), args
