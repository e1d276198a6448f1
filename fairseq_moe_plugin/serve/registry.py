"""The model registry of ``fairseq-moe-serve --registry FILE``: its file format and its complete
validation (nothing is loaded here; ``deployment.py`` loads what this describes).

A YAML (``.yaml``/``.yml``, read with a ``yaml.SafeLoader``) or JSON (``.json``) file::

    default_model: mt              # optional: the model of requests that name none
    breaker: {window: 50}          # optional: breaker defaults for every model
    models:
      mt:
        breaker: {max_error_rate: 0.5, max_p95_ms: 2000}   # optional, per model
        versions:
          v1: {checkpoint: ckpt/v1.pt, weight: 90}
          v2: {checkpoint: ckpt/v2.pt, weight: 10, engine: onnx}
          v3: {checkpoint: ckpt/v3.pt, shadow: true, shadow_fraction: 0.2}

A version takes ``checkpoint`` (required; relative paths are relative to the file's folder),
``weight`` (>= 0, default 1; a shadow version has none), ``engine`` (``torch`` or ``onnx``; default: ``--engine``),
``shadow`` and ``shadow_fraction`` (the share of the model's traffic copied to it, default 1),
and ``data``, ``spm_model``, ``decrypt_key_file`` (default: the command line's). The
non-shadow weights of a model must sum to a positive number.

What this adds over ``yaml.safe_load``/``json.load``: duplicate keys (two versions with one
name) are refused instead of silently keeping the last, unknown keys are refused, every error
names the file and the entry (``models.mt.versions.v2.weight``), and a version has an
``identity`` (its files and their size and mtime) that says whether a reload changed it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

ENGINES = ("torch", "onnx")
TOP_KEYS = ("models", "default_model", "breaker", "share_dictionaries")
MODEL_KEYS = ("versions", "breaker")
VERSION_KEYS = ("checkpoint", "weight", "engine", "shadow", "shadow_fraction", "data",
                "spm_model", "decrypt_key_file")  # fmt: skip
DEFAULT_MODEL, DEFAULT_VERSION = "default", "v1"  # the registry of one checkpoint


class RegistryError(ValueError):
    """A registry file that cannot be served; the message names the file and the entry."""


@dataclass(frozen=True)
class BreakerConfig:
    """Circuit-breaker thresholds of a model's versions (see ``breaker.py``)."""

    window: int = 50  # the last N requests of a version that the rates are taken over
    min_requests: int = 10  # no trip before this many requests in the window
    max_error_rate: float = 0.5  # trip when the window's failure share is above this
    max_p95_ms: float | None = None  # trip when the window's p95 latency is above this (ms)
    cooldown_s: float = 30.0  # open this long, then half-open
    probe_share: float = 0.1  # half-open: this share of the version's weight
    probe_requests: int = 5  # half-open: close after this many successes in a row


@dataclass(frozen=True)
class VersionSpec:
    model: str
    name: str
    checkpoint: str
    weight: float = 1.0
    engine: str | None = None  # None: the command line's --engine
    shadow: bool = False
    shadow_fraction: float = 1.0
    data: str | None = None
    spm_model: str | None = None
    decrypt_key_file: str | None = None

    def identity(self) -> tuple:
        """What the loaded engine depends on: a version whose identity is unchanged keeps its
        engine across a reload (a checkpoint replaced at the same path has a new identity)."""
        stats = []
        paths = [self.spm_model, self.decrypt_key_file]
        if os.path.isdir(self.checkpoint):  # an ONNX export folder: every file in it
            paths += sorted(str(p) for p in Path(self.checkpoint).iterdir() if p.is_file())
        else:
            paths.append(self.checkpoint)
        for path in paths:
            st = os.stat(path) if path else None
            stats.append((path, st.st_size if st else None, st.st_mtime_ns if st else None))
        return (self.engine, self.data, *stats)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    versions: dict[str, VersionSpec]
    breaker: BreakerConfig = field(default_factory=BreakerConfig)

    @property
    def primaries(self) -> list[VersionSpec]:
        return [v for v in self.versions.values() if not v.shadow]

    @property
    def shadows(self) -> list[VersionSpec]:
        return [v for v in self.versions.values() if v.shadow]


@dataclass(frozen=True)
class RegistrySpec:
    models: dict[str, ModelSpec]
    default_model: str | None = None
    share_dictionaries: bool = True
    path: str | None = None  # the file it was read from (None: the single-checkpoint CLI)


def registry_of_one(checkpoint: str) -> RegistrySpec:
    """The registry of ``fairseq-moe-serve CHECKPOINT``: model ``default``, version ``v1``."""
    version = VersionSpec(DEFAULT_MODEL, DEFAULT_VERSION, str(checkpoint))
    model = ModelSpec(DEFAULT_MODEL, {DEFAULT_VERSION: version})
    return RegistrySpec({DEFAULT_MODEL: model}, default_model=DEFAULT_MODEL)


# -- reading --------------------------------------------------------------------------------


def _yaml_loader():
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        """``yaml.SafeLoader`` that refuses a key given twice in one mapping."""

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    line = key_node.start_mark.line + 1
                    raise RegistryError(f"duplicate key {key!r} (line {line})")
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def _unique_pairs(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise RegistryError(f"duplicate key {key!r}")
        out[key] = value
    return out


def read_registry_file(path: str | os.PathLike) -> dict:
    """The file's content as plain data (YAML or JSON by extension)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise RegistryError(f"registry {path}: expected a .yaml, .yml or .json file")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RegistryError(f"registry {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RegistryError(f"registry {path}: cannot read it: {e}") from e
    try:
        if suffix == ".json":
            return json.loads(text, object_pairs_hook=_unique_pairs)
        import yaml

        return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 (a SafeLoader subclass)
    except RegistryError as e:
        raise RegistryError(f"registry {path}: {e}") from None
    except ValueError as e:  # json.JSONDecodeError
        raise RegistryError(f"registry {path}: not valid JSON: {e}") from e
    except Exception as e:  # yaml.YAMLError
        raise RegistryError(f"registry {path}: not valid YAML: {e}") from e


def load_registry(path: str | os.PathLike) -> RegistrySpec:
    """Read and validate a registry file completely (every file it names must exist)."""
    return parse_registry(read_registry_file(path), Path(path))


# -- validation -----------------------------------------------------------------------------


def _mapping(value, where: str, allowed: tuple[str, ...] | None, fail) -> dict:
    if not isinstance(value, dict):
        fail(where, f"must be a mapping, got {type(value).__name__}")
    if allowed is not None:
        unknown = sorted(str(k) for k in set(value) - set(allowed))
        if unknown:
            fail(where, f"unknown key(s) {unknown}; allowed: {', '.join(allowed)}")
    return value


def _number(value, where: str, fail, low: float | None = None, high: float | None = None,
            integer: bool = False, low_open: bool = False):  # fmt: skip
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        fail(where, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        fail(where, f"must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        fail(where, f"must be <= {high}, got {value!r}")
    return value


def parse_breaker(value, where: str, base: BreakerConfig, fail) -> BreakerConfig:
    names = tuple(f.name for f in fields(BreakerConfig))
    raw = _mapping(value, where, names, fail)
    checks = {"window": dict(low=1, integer=True), "min_requests": dict(low=1, integer=True),
              "max_error_rate": dict(low=0, high=1), "max_p95_ms": dict(low=0, low_open=True),
              "cooldown_s": dict(low=0), "probe_share": dict(low=0, high=1, low_open=True),
              "probe_requests": dict(low=1, integer=True)}  # fmt: skip
    out = {}
    for name, v in raw.items():
        if name == "max_p95_ms" and v is None:
            out[name] = None
            continue
        out[name] = _number(v, f"{where}.{name}", fail, **checks[name])
    config = BreakerConfig(**{**base.__dict__, **out})
    if config.min_requests > config.window:
        fail(where, f"min_requests {config.min_requests} is larger than window {config.window}")
    return config


def _path(value, where: str, base: Path, fail, kind: str = "file") -> str:
    if not isinstance(value, str) or not value:
        fail(where, f"must be a path (a string), got {value!r}")
    path = Path(value) if Path(value).is_absolute() else base / value
    if kind == "checkpoint":  # a checkpoint file, or an ONNX export folder (engine onnx)
        exists, kind = path.is_file() or path.is_dir(), "checkpoint file or ONNX folder"
    else:
        exists = path.is_dir() if kind == "folder" else path.is_file()
    if not exists:
        fail(where, f"{path}: no such {kind}")
    return str(path)


def parse_registry(raw, path: Path) -> RegistrySpec:
    """Validate ``raw`` (the file's data) and return the registry; RegistryError naming the file
    and the first bad entry."""

    def fail(where: str, message: str):
        raise RegistryError(f"registry {path}: {where}: {message}")

    base = path.parent
    top = _mapping(raw if raw is not None else {}, "top level", TOP_KEYS, fail)
    breaker = BreakerConfig()
    if "breaker" in top:
        breaker = parse_breaker(top["breaker"], "breaker", breaker, fail)
    share = top.get("share_dictionaries", True)
    if not isinstance(share, bool):
        fail("share_dictionaries", f"must be true or false, got {share!r}")
    models_raw = _mapping(top.get("models"), "models", None, fail) if "models" in top else None
    if not models_raw:
        fail("models", "no model: the registry needs at least one model with a version")
    models = {}
    for model_name, model_raw in models_raw.items():
        where = f"models.{model_name}"
        if not isinstance(model_name, str) or not model_name or "/" in model_name:
            fail(where, "a model name must be a non-empty string without '/'")
        model_raw = _mapping(model_raw, where, MODEL_KEYS, fail)
        model_breaker = breaker
        if "breaker" in model_raw:
            model_breaker = parse_breaker(model_raw["breaker"], f"{where}.breaker", breaker, fail)
        versions_raw = model_raw.get("versions")
        if not versions_raw:
            fail(f"{where}.versions", "no version: a model needs at least one")
        versions_raw = _mapping(versions_raw, f"{where}.versions", None, fail)
        versions = {}
        for version_name, v in versions_raw.items():
            vwhere = f"{where}.versions.{version_name}"
            if not isinstance(version_name, str | int) or isinstance(version_name, bool):
                fail(vwhere, "a version name must be a string")
            version_name = str(version_name)
            if not version_name or "/" in version_name:
                fail(vwhere, "a version name must be non-empty and without '/'")
            versions[version_name] = _parse_version(model_name, version_name, v, vwhere, base,
                                                    fail)  # fmt: skip
        model = ModelSpec(model_name, versions, model_breaker)
        if not model.primaries:
            fail(f"{where}.versions", "every version is a shadow: at least one must serve")
        total = sum(v.weight for v in model.primaries)
        if not total > 0:
            fail(f"{where}.versions", f"the weights sum to {total:g}: they must sum to a "
                 "positive number")  # fmt: skip
        models[model_name] = model
    default = top.get("default_model")
    if default is not None and default not in models:
        fail("default_model", f"{default!r} is not a model of the registry ({sorted(models)})")
    return RegistrySpec(models, default_model=default, share_dictionaries=share, path=str(path))


def _parse_version(model: str, name: str, v, where: str, base: Path, fail) -> VersionSpec:
    v = _mapping(v, where, VERSION_KEYS, fail)
    if "checkpoint" not in v:
        fail(where, "no checkpoint: a version needs 'checkpoint: PATH'")
    checkpoint = _path(v["checkpoint"], f"{where}.checkpoint", base, fail, "checkpoint")
    shadow = v.get("shadow", False)
    if not isinstance(shadow, bool):
        fail(f"{where}.shadow", f"must be true or false, got {shadow!r}")
    if shadow and "weight" in v:
        fail(f"{where}.weight", "a shadow version takes no weight (it gets shadow_fraction of "
             "the traffic as a copy)")  # fmt: skip
    if not shadow and "shadow_fraction" in v:
        fail(f"{where}.shadow_fraction", "only a shadow version (shadow: true) takes one")
    weight = 0.0 if shadow else float(_number(v.get("weight", 1.0), f"{where}.weight", fail, 0))
    fraction = float(_number(v.get("shadow_fraction", 1.0), f"{where}.shadow_fraction", fail,
                             0, 1, low_open=True))  # fmt: skip
    engine = v.get("engine")
    if engine is not None and engine not in ENGINES:
        fail(f"{where}.engine", f"unknown engine {engine!r}; one of {', '.join(ENGINES)}")
    files = {}
    for key, kind in (("data", "folder"), ("spm_model", "file"), ("decrypt_key_file", "file")):
        if v.get(key) is not None:
            files[key] = _path(v[key], f"{where}.{key}", base, fail, kind)
    return VersionSpec(model, name, checkpoint, weight=weight, engine=engine, shadow=shadow,
                       shadow_fraction=fraction, **files)  # fmt: skip
