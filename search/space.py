"""Search spaces are data files (spaces/*.yaml). This module parses and validates them and turns them into Ray Tune
domains for OptunaSearch; parsing does no I/O beyond reading the file and loads nothing else.

A space file:

    params:
      lora.r: {type: choice, values: [8, 16, 32]}
      optim.learning_rate: {type: loguniform, low: 1.0e-3, high: 1.0e-2}
    points_to_evaluate:
      - {lora.r: 16, optim.learning_rate: 5.0e-3}

Each key is a dotted trial setting (see trainables/settings.py); every value a space can produce must be a valid
setting, which is checked here by validating the bounds and choices against the settings schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainables.settings import SettingsError, TrialSettings

TYPES = {"choice": {"values"}, "uniform": {"low", "high"}, "loguniform": {"low", "high"},
         "randint": {"low", "high"}, "quniform": {"low", "high", "q"}}


@dataclass(frozen=True)
class Param:
    key: str
    type: str
    low: float | None = None
    high: float | None = None
    q: float | None = None
    values: tuple = ()

    def extremes(self) -> list[Any]:
        return list(self.values) if self.type == "choice" else [self.low, self.high]


@dataclass(frozen=True)
class Space:
    source: str
    params: dict[str, Param]
    points_to_evaluate: list[dict[str, Any]] = field(default_factory=list)


def parse_space(data: Any, source: str, base: TrialSettings | None = None) -> Space:
    """Validate a loaded space document; errors name `source` and the key."""
    if not isinstance(data, dict):
        raise SettingsError(f"{source}: expected a mapping with 'params' (and optionally 'points_to_evaluate')")
    unknown = set(data) - {"params", "points_to_evaluate"}
    if unknown:
        raise SettingsError(f"{source}: unknown top-level key {sorted(unknown)[0]!r}; known: params, points_to_evaluate")
    raw_params = data.get("params")
    if not isinstance(raw_params, dict) or not raw_params:
        raise SettingsError(f"{source}: 'params' must be a non-empty mapping of setting -> distribution")
    base = base or TrialSettings()
    params = {key: _parse_param(key, spec, source, base) for key, spec in raw_params.items()}
    points = data.get("points_to_evaluate") or []
    if not isinstance(points, list):
        raise SettingsError(f"{source}: points_to_evaluate must be a list of mappings")
    for i, point in enumerate(points):
        if not isinstance(point, dict):
            raise SettingsError(f"{source}: points_to_evaluate[{i}] must be a mapping of setting -> value")
        for key, value in point.items():
            if key not in params:
                raise SettingsError(f"{source}: points_to_evaluate[{i}].{key}: not a key of params "
                                    f"({', '.join(params)})")
            if not _in_domain(params[key], value):
                raise SettingsError(f"{source}: points_to_evaluate[{i}].{key}={value!r} is outside its range")
        _check_settings(base, point, f"{source}: points_to_evaluate[{i}]")
    return Space(source, params, points)


def _parse_param(key: str, spec: Any, source: str, base: TrialSettings) -> Param:
    where = f"{source}: params.{key}"
    if not isinstance(spec, dict) or "type" not in spec:
        raise SettingsError(f"{where}: expected {{type: ..., ...}} with type one of {', '.join(TYPES)}")
    kind = spec["type"]
    if kind not in TYPES:
        raise SettingsError(f"{where}: type {kind!r} is not one of {', '.join(TYPES)}")
    extra = set(spec) - TYPES[kind] - {"type"}
    missing = TYPES[kind] - set(spec)
    if extra:
        raise SettingsError(f"{where}: unknown key {sorted(extra)[0]!r} for type {kind}; "
                            f"expected {', '.join(sorted(TYPES[kind]))}")
    if missing:
        raise SettingsError(f"{where}: missing {', '.join(sorted(missing))} for type {kind}")
    if kind == "choice":
        values = spec["values"]
        if not isinstance(values, list) or not values:
            raise SettingsError(f"{where}: values must be a non-empty list")
        param = Param(key, kind, values=tuple(values))
    else:
        nums = {}
        for name in TYPES[kind]:
            v = spec[name]
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise SettingsError(f"{where}: {name} must be a number, got {v!r}")
            nums[name] = v
        if nums["low"] > nums["high"]:
            raise SettingsError(f"{where}: low <= high must hold, got low={nums['low']}, high={nums['high']}")
        if kind == "loguniform" and nums["low"] <= 0:
            raise SettingsError(f"{where}: loguniform needs low > 0, got {nums['low']}")
        param = Param(key, kind, low=nums["low"], high=nums["high"], q=nums.get("q"))
    for value in param.extremes():
        _check_settings(base, {key: value}, where)
    return param


def _check_settings(base: TrialSettings, values: dict[str, Any], where: str) -> None:
    try:
        base.with_values(values)
    except SettingsError as err:
        msg = str(err).replace("trial settings: ", "")
        if "unknown key" in msg:
            raise SettingsError(f"{where}: not a trial setting ({msg})") from None
        raise SettingsError(f"{where}: {msg}") from None


def _in_domain(p: Param, value: Any) -> bool:
    if p.type == "choice":
        return value in p.values
    return isinstance(value, (int, float)) and not isinstance(value, bool) and p.low <= value <= p.high


def load_space(path: str | Path, base: TrialSettings | None = None) -> Space:
    p = Path(path)
    if not p.is_file():
        raise SettingsError(f"{path}: space file not found; see spaces/ for examples")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise SettingsError(f"{path}{':' + str(mark.line + 1) if mark else ''}: not valid YAML") from None
    return parse_space(data, str(path), base)


def to_tune(space: Space) -> dict[str, Any]:
    """Ray Tune domains, keyed by dotted setting name."""
    from ray import tune

    out = {}
    for key, p in space.params.items():
        if p.type == "choice":
            out[key] = tune.choice(list(p.values))
        elif p.type == "uniform":
            out[key] = tune.uniform(p.low, p.high)
        elif p.type == "loguniform":
            out[key] = tune.loguniform(p.low, p.high)
        elif p.type == "randint":
            out[key] = tune.randint(int(p.low), int(p.high) + 1)
        elif p.type == "quniform":
            out[key] = tune.quniform(p.low, p.high, p.q)
    return out


def describe(space: Space) -> list[str]:
    lines = []
    for key, p in space.params.items():
        rng = f"{list(p.values)}" if p.type == "choice" else f"[{p.low}, {p.high}]"
        lines.append(f"  {key:32s} {p.type:10s} {rng}")
    for point in space.points_to_evaluate:
        lines.append(f"  start point: {point}")
    return lines
