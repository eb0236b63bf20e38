"""Search spaces: YAML that mirrors the spec tree, with distributions at the leaves.

    depth: {int: [2, 4]}                     # Optuna IntDistribution, both ends included
    block:
      variants:                              # pick the block kind, then only its own knobs
        mag: {window: {choice: [16, 32]}}
        mac: {segment_len: {choice: [16, 32]}}
      memory:                                # knobs shared by the listed kinds that have them
        lr: {theta_max: {float: [0.01, 0.1], log: true}}
        momentum: {choice: [null, {init: 0.1}]}   # null switches a mechanism off

Leaves are exactly `{int: [lo, hi]}` (optional `log`, `step`), `{float: [lo, hi]}` (optional `log`,
`step`) and `{choice: [...]}`: Optuna's three distributions, one to one. Any other value is a
constant override. One function, `sample(trial, space)`, serves the search (Optuna define-by-run),
replays (`optuna.trial.FixedTrial`) and export. Parameter names are dotted spec paths with the
chosen kind inserted after a union field (`block.kind`, `block.mag.window`, `block.memory.lr.theta_max`).
"""

from __future__ import annotations

import difflib
import json
from typing import Any

import optuna
from pydantic import BaseModel

from titans_nas.config import SpecError, compose, models_in, union_members, validate
from titans_nas.spec import ModelSpec

optuna.logging.set_verbosity(optuna.logging.WARNING)

LEAVES = ("int", "float", "choice")
LEAF_DOCS = {
    "int": ("{int: [lo, hi]}", "An integer in [lo, hi], both ends included (Optuna IntDistribution)."),
    "float": ("{float: [lo, hi]}", "A number in [lo, hi] (Optuna FloatDistribution)."),
    "choice": (
        "{choice: [a, b, ...]}",
        "One of the listed values: numbers, strings, null (switches a"
        " mechanism off) or mappings (a whole sub-spec) (Optuna CategoricalDistribution).",
    ),
    "log": ("log: true", "With int or float: sample on a log scale (the low bound must be positive)."),
    "step": ("step: s", "With int or float: only lo, lo+s, lo+2s, ..."),
    "variants": (
        "variants: {kind: {knobs}}",
        "Under a field with kinds (a union, e.g. `block`, `memory.model`):"
        " first pick the kind, then sample only that kind's knobs; keys next to `variants` are knobs"
        " shared by the listed kinds that have the field (each must exist on at least one).",
    ),
}
"""Every key of the space grammar and what it means (the generated reference lists them)."""
Space = dict[str, Any]


def is_leaf(value: Any) -> bool:
    return isinstance(value, dict) and any(k in value for k in LEAVES)


def _encode(choices: list) -> tuple[list, bool]:
    """Optuna categoricals hold None/bool/int/float/str; other choices travel as JSON labels."""
    plain = all(c is None or isinstance(c, (bool, int, float, str)) for c in choices)
    return (list(choices), False) if plain else ([json.dumps(c, sort_keys=True) for c in choices], True)


def _suggest(trial: Any, name: str, leaf: dict) -> Any:
    if "int" in leaf:
        lo, hi = leaf["int"]
        return trial.suggest_int(name, lo, hi, log=bool(leaf.get("log", False)), step=leaf.get("step", 1))
    if "float" in leaf:
        lo, hi = leaf["float"]
        return trial.suggest_float(name, lo, hi, log=bool(leaf.get("log", False)), step=leaf.get("step"))
    labels, encoded = _encode(leaf["choice"])
    value = trial.suggest_categorical(name, labels)
    return json.loads(value) if encoded else value


def sample(trial: Any, space: Space, prefix: str = "", cls: type[BaseModel] | None = ModelSpec) -> dict[str, Any]:
    """Define-by-run: the spec overrides (nested plain data) that `trial` picks from `space`.
    `cls` is the spec class the node configures (None where unknown); it decides which shared
    knobs next to `variants` apply to the chosen kind: those the kind has."""
    out: dict[str, Any] = {}
    for key, value in space.items():
        path = f"{prefix}{key}"
        if is_leaf(value):
            out[key] = _suggest(trial, path, value)
        elif isinstance(value, dict) and "variants" in value:
            variants, members = value["variants"], _kinds_of(cls, key)
            kind = trial.suggest_categorical(f"{path}.kind", list(variants))
            chosen = members.get(kind)
            node = {"kind": kind, **sample(trial, variants[kind] or {}, f"{path}.{kind}.", chosen)}
            has = (lambda k: True) if chosen is None else (lambda k: k in chosen.model_fields)
            shared = {k: v for k, v in value.items() if k != "variants" and has(k)}
            node.update(sample(trial, shared, f"{path}.", chosen))
            out[key] = node
        elif isinstance(value, dict):
            out[key] = sample(trial, value, f"{path}.", _model_of(cls, key))
        else:
            out[key] = value
    return out


def _kinds_of(cls: type[BaseModel] | None, key: str) -> dict[str, type[BaseModel]]:
    """The members by tag of the union field `key` of `cls` (empty where unknown)."""
    if cls is None or key not in cls.model_fields:
        return {}
    return union_members(cls.model_fields[key].annotation)


def _model_of(cls: type[BaseModel] | None, key: str) -> type[BaseModel] | None:
    """The one spec class of field `key` of `cls`, None for a union or an unknown field."""
    if cls is None or key not in cls.model_fields:
        return None
    models = models_in(cls.model_fields[key].annotation)
    return models[0] if len(models) == 1 else None


def apply(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """base spec data + sampled overrides, composed as two layers (config.compose's rules)."""
    return compose(("base", base), ("search space", overrides), cls=ModelSpec)[0]


def replay(base: ModelSpec, space: Space, params: dict[str, Any]) -> tuple[ModelSpec, dict[str, Any]]:
    """Replay a trial from its Optuna params (FixedTrial through `sample`): the model spec it
    trained, and its `train` knobs (TrainSpec field -> value) when the space has any."""
    overrides = sample(optuna.trial.FixedTrial(params), space)
    train = overrides.pop("train", {})
    return validate(apply(base.model_dump(mode="json"), overrides), ModelSpec, {"": "search space"}), train


def spec_from_params(base: ModelSpec, space: Space, params: dict[str, Any]) -> ModelSpec:
    """The model spec a trial with these Optuna params trained."""
    return replay(base, space, params)[0]


class _PointTrial:
    """Replays `sample` with the values of an enqueued point, defaults (first choice, low bound)
    for the rest; collects the Optuna params the point sets, encoded as `sample` suggests them."""

    def __init__(self, point: dict[str, Any]) -> None:
        self.point, self.params, self.used = point, {}, set()

    def _pick(self, name: str, default: Any, encoded: Any = None) -> Any:
        """The point's value for `name` (recorded in Optuna's encoding), or `default`."""
        if name not in self.point:
            return default
        self.used.add(name)
        self.params[name] = self.point[name] if encoded is None else encoded
        return self.params[name]

    def suggest_int(self, name: str, lo: int, hi: int, **_: Any) -> int:
        value = self._pick(name, lo)
        if not (isinstance(value, int) and lo <= value <= hi):
            raise ValueError(f"{name}: {value!r} is not an integer in [{lo}, {hi}]")
        return value

    def suggest_float(self, name: str, lo: float, hi: float, **_: Any) -> float:
        value = self._pick(name, lo)
        if not (isinstance(value, (int, float)) and lo <= value <= hi):
            raise ValueError(f"{name}: {value!r} is not a number in [{lo}, {hi}]")
        return float(value)

    def suggest_categorical(self, name: str, labels: list) -> Any:
        if name not in self.point:
            return labels[0]
        raw = self.point[name]
        value = raw if raw in labels else json.dumps(raw, sort_keys=True)  # non-plain choices are JSON labels
        if value not in labels:
            raise ValueError(f"{name}: {raw!r} is not one of the choices")
        return self._pick(name, None, encoded=value)


def enqueued_params(points: list[dict[str, Any]], space: Space, source: str) -> list[dict]:
    """Configurations to try first (Optuna's enqueue_trial), keyed by parameter name (`heads`,
    `block.kind`, `block.mag.window`), returned in Optuna's encoding. Each name and value must
    belong to the space; like any sampled point, a configuration the spec rules refuse runs as a
    failed trial."""
    out = []
    for i, point in enumerate(points):
        trial = _PointTrial(point)
        try:
            sample(trial, space)
        except ValueError as e:
            raise SpecError(source, f"enqueue.{i}", str(e)) from None
        unknown = set(point) - trial.used
        if unknown:
            raise SpecError(source, f"enqueue.{i}", f"not parameters of the space here: {', '.join(sorted(unknown))}")
        out.append(trial.params)
    return out


# ---------------------------------------------------------------------------------------------
# validation, before anything starts


def check_space(space: Any, base: ModelSpec, source: str, probes: int = 24) -> None:
    """Structure (every key a field of the spec class at that point, every variant a kind of the
    union, every leaf a well-formed domain), then probing: random samples of the space must give
    valid specs, for every variant. Raises SpecError(source, dotted path, reason)."""
    if not isinstance(space, dict):
        raise SpecError(source, "", "a search space is a mapping that mirrors the model spec")
    _check_node(space, ModelSpec, base.model_dump(mode="json"), "", source)
    _probe(space, base, source, probes)


def _unknown(source: str, path: str, key: str, cls: type[BaseModel]) -> SpecError:
    fields = list(cls.model_fields)
    close = difflib.get_close_matches(key, fields, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'?" if close else f"{cls.__name__} has: {', '.join(fields)}"
    return SpecError(source, path, f"unknown field '{key}' ({hint})")


def _check_leaf(leaf: dict, source: str, path: str) -> None:
    kinds = [k for k in LEAVES if k in leaf]
    extra = set(leaf) - {*LEAVES, "log", "step"}
    if len(kinds) != 1 or extra:
        raise SpecError(
            source,
            path,
            "a leaf is exactly one of {int: [lo, hi]}, {float: [lo, hi]}, {choice: [...]}"
            + (f"; unexpected keys {sorted(extra)}" if extra else ""),
        )
    kind = kinds[0]
    domain = leaf[kind]
    if kind == "choice":
        if not isinstance(domain, list) or not domain:
            raise SpecError(source, path, "choice needs a non-empty list")
        if "log" in leaf or "step" in leaf:
            raise SpecError(source, path, "log and step go with int and float, not choice")
        return
    if not (isinstance(domain, list) and len(domain) == 2):
        raise SpecError(source, path, f"{kind} needs [low, high]")
    lo, hi = domain
    number = int if kind == "int" else (int, float)
    if not all(isinstance(x, number) and not isinstance(x, bool) for x in domain):
        raise SpecError(source, path, f"{kind} bounds must be {'integers' if kind == 'int' else 'numbers'}: {domain}")
    if lo > hi:
        raise SpecError(source, path, f"low {lo} is above high {hi}")
    if leaf.get("log") and lo <= 0:
        raise SpecError(source, path, f"a log domain needs a positive low bound, got {lo}")
    step = leaf.get("step")
    if step is not None:
        if not isinstance(step, number) or isinstance(step, bool) or step <= 0:
            raise SpecError(source, path, f"step must be a positive {'integer' if kind == 'int' else 'number'}: {step}")
        if leaf.get("log") and step != 1:  # Optuna samples a log domain without a grid
            raise SpecError(source, path, "log and step cannot go together (Optuna: step must be 1 on a log scale)")


def _check_node(node: dict, cls: type[BaseModel], base: Any, prefix: str, source: str) -> None:
    for key, value in node.items():
        path = f"{prefix}{key}"
        if key not in cls.model_fields:
            raise _unknown(source, path, key, cls)
        if is_leaf(value):
            _check_leaf(value, source, path)
            continue
        if not isinstance(value, dict):
            continue  # a constant: checked by probing
        field = cls.model_fields[key]
        members = _kinds_of(cls, key)
        sub_base = base.get(key) if isinstance(base, dict) else None
        if "variants" in value:
            if not members:
                raise SpecError(source, f"{path}.variants", "variants need a field with kinds (a union)")
            variants = value["variants"]
            if not isinstance(variants, dict) or not variants:
                raise SpecError(source, f"{path}.variants", "variants map kinds to their knobs")
            for kind, sub in variants.items():
                if kind not in members:
                    raise SpecError(
                        source,
                        f"{path}.variants.{kind}",
                        f"unknown kind '{kind}' (expected one of: {', '.join(members)})",
                    )
                if sub is not None and not isinstance(sub, dict):
                    raise SpecError(source, f"{path}.variants.{kind}", "a variant's knobs are a mapping (or {})")
                _check_node(sub or {}, members[kind], None, f"{path}.", source)
                shared = {k: v for k, v in value.items() if k != "variants" and k in members[kind].model_fields}
                _check_node(shared, members[kind], None, f"{path}.", source)
            for k in value:  # a shared knob applies to the listed kinds that have it: at least one
                if k != "variants" and not any(k in members[kind].model_fields for kind in variants):
                    raise _unknown(source, f"{path}.{k}", k, members[next(iter(variants))])
            continue
        if members:  # no variants: the knobs apply to the base spec's kind
            kind = sub_base.get("kind") if isinstance(sub_base, dict) else None
            target = members.get(kind) or next(iter(members.values()))
        else:
            models = models_in(field.annotation)
            if len(models) != 1:
                raise SpecError(source, path, "this field is not a spec: give a leaf or a constant")
            target = models[0]
        _check_node(value, target, sub_base, f"{path}.", source)


def _probe(space: Space, base: ModelSpec, source: str, probes: int) -> None:
    """Random samples must validate; every variant must have at least one valid sample."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen_ok: set[str] = set()
    failures: dict[str, SpecError] = {}
    kinds_seen: set[str] = set()
    base_data = base.model_dump(mode="json")
    for _ in range(probes):
        trial = study.ask()
        overrides = sample(trial, space)
        label = ",".join(f"{k}={v}" for k, v in sorted(trial.params.items()) if k.endswith(".kind"))
        kinds_seen.add(label)
        try:
            validate(apply(base_data, overrides), ModelSpec, {"": source})
            seen_ok.add(label)
        except SpecError as e:
            failures.setdefault(label, e)
        study.tell(trial, 0.0)
    for label in sorted(kinds_seen - seen_ok):
        e = failures[label]
        what = f" (with {label})" if label else ""
        raise SpecError(source, e.path, f"no sampled configuration is valid{what}: {e.reason}")
