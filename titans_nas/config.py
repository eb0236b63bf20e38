"""YAML -> spec: one composition pipeline (`compose`), one validation, and errors that name the
file, the dotted path and the reason.

Every spec (model, task, study, a search-space sample, an ablation variant) is composed by
`compose` from layers: preset names and files (each may start with `extends: <preset | path>`
or a list of them, merged first, in order), inline mappings (which may extend too), then the
`--set a.b=c` overrides (OmegaConf dotlist), one layer each. Its three rules:

1. Later layers win and mappings merge deeply; a layer that changes the `kind` of a sub-spec
   keeps the fields the new kind shares and drops the others (a MAG `window` does not leak
   into a MAC block, its `memory` carries over).
2. A sub-spec whose `kind` no layer gives is of the field default's kind (`--set norm.eps=1e-5`
   edits the default RMSNorm).
3. Provenance: every dotted path is attributed to the last layer that set it, and an error on a
   field names that layer (a preset's field broken by the user's change names the user's file).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar, get_args

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ValidationError

from components.base import SpecRuleError
from titans_nas.spec import ModelSpec

S = TypeVar("S", bound=BaseModel)


class SpecError(Exception):
    """A spec that cannot be loaded. The CLI prints `str(error)` and exits with code 2."""

    def __init__(self, source: str, path: str, reason: str) -> None:
        super().__init__(source, path, reason)  # args = constructor args: copyable, picklable (Ray)
        self.source, self.path, self.reason = source, path, reason

    def __str__(self) -> str:
        return f"{self.source}: {self.path}: {self.reason}" if self.path else f"{self.source}: {self.reason}"


def preset_dir() -> Path:
    return Path(str(resources.files("components") / "presets"))


def preset_names() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def resolve_ref(
    ref: str, relative_to: Path | None = None, where: str = "command line", presets: Path | None = None
) -> Path:
    """A preset name or a path (relative to the referring file, then to the working dir)."""
    presets = presets or preset_dir()
    candidates = [Path(ref)] if relative_to is None else [relative_to / ref, Path(ref)]
    for path in candidates:
        if path.is_file():
            return path
    preset = presets / f"{ref}.yaml"
    if "/" not in ref and not ref.endswith((".yaml", ".yml")) and preset.is_file():
        return preset
    names = sorted(p.stem for p in presets.glob("*.yaml"))
    close = difflib.get_close_matches(ref, names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (presets: {', '.join(names)})"
    raise SpecError(where, "", f"no preset or file named '{ref}'{hint}")


EXPANDED_NODES = 100_000
"""The most YAML nodes a file or `--set` value may stand for once its aliases are expanded: a
spec is a few hundred; nested anchors ("billion laughs") multiply without bound and would hang
the merge that copies them."""


def check_aliases(text: str, source: str) -> None:
    """Refuse YAML whose aliases expand past EXPANDED_NODES nodes, or refer to themselves,
    before anything is built from it (the node graph is composed, never expanded)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return  # malformed: the loader reports it with its line and column
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise SpecError(source, "", "a YAML alias refers to a node that contains it (recursive anchor)")
        open_nodes.add(key)
        children = node.value if isinstance(node, yaml.SequenceNode) else []
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        total = 1
        for child in children:
            total += size(child)
            if total > EXPANDED_NODES:
                raise SpecError(
                    source, "", f"its YAML aliases expand to more than {EXPANDED_NODES:,} nodes (nested anchors)"
                )
        open_nodes.discard(key)
        sizes[key] = total
        return total

    if root is not None:
        size(root)


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
        check_aliases(text, str(path))
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(str(path), "", f"malformed YAML: {at}{problem}") from None
    except OSError as e:
        raise SpecError(str(path), "", f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise SpecError(str(path), "", f"not UTF-8 text (byte {e.start}: {e.reason})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpecError(str(path), "", f"expected a mapping of fields, got {type(data).__name__}")
    return data


Layer = tuple[str, dict[str, Any]]
"""One layer of a composition: its label (a file, `--set a=b`, `study.yaml (model)`) and data."""

Source = str | Path | Layer
"""What `compose` layers: a preset name or a path, or an inline (label, mapping) that may extend."""


def _layers(
    ref: str, relative_to: Path | None, chain: tuple[Path, ...], where: str, presets: Path | None
) -> list[Layer]:
    path = resolve_ref(ref, relative_to, where, presets).resolve()
    if path in chain:
        raise SpecError(str(path), "extends", "circular extends: " + " -> ".join(map(str, (*chain, path))))
    data = read_yaml(path)
    parents = data.pop("extends", None)
    return [*_extended(parents, path.parent, (*chain, path), str(path), presets), (_label(path), data)]


def _extended(
    parents: Any, relative_to: Path | None, chain: tuple[Path, ...], where: str, presets: Path | None
) -> list[Layer]:
    """The layers of an `extends:` value (a preset name, a path or a list of them), in order."""
    if parents is not None and not isinstance(parents, str | list):
        raise SpecError(where, "extends", "expected a preset name, a path or a list of them")
    layers: list[Layer] = []
    for parent in [parents] if isinstance(parents, str) else (parents or []):
        if not isinstance(parent, str):
            raise SpecError(where, "extends", "expected a preset name, a path or a list of them")
        layers += _layers(parent, relative_to, chain, where, presets)
    return layers


def _label(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def drop_switched(base: Any, over: Any, cls: type[BaseModel] | None = None) -> Any:
    """Copy of `base` prepared for merging `over` on top: where `over` changes the `kind` of a
    sub-spec, the old sub-spec's fields that the new kind does not have are dropped (so a MAG
    `window` never leaks into a MAC block, while `memory`, `attention` and `persistent` carry
    over). Without the spec class `cls` to tell the fields apart, the whole sub-spec is dropped."""
    if not (isinstance(base, dict) and isinstance(over, dict)):
        return base
    out = {}
    for key, value in base.items():
        if key not in over:
            out[key] = value
            continue
        field = cls.model_fields.get(key) if cls is not None else None
        members = union_members(field.annotation) if field is not None else {}
        new, old = over[key], value
        if (
            isinstance(new, dict)
            and isinstance(old, dict)
            and "kind" in new
            and old.get("kind", new["kind"]) != new["kind"]
        ):
            target = members.get(new["kind"]) if isinstance(new["kind"], str) else None
            if target is None:
                continue  # no schema to go by: replace the sub-spec
            old = {k: v for k, v in old.items() if k in target.model_fields and k != "kind"}
            out[key] = {k: drop_switched(v, new.get(k), _single(target, k)) for k, v in old.items()}
            continue
        out[key] = drop_switched(old, new, _single(cls, key) if cls is not None else None)
    return out


def _single(cls: type[BaseModel] | None, key: str) -> type[BaseModel] | None:
    """The spec class of field `key` when it is a single (possibly optional) spec."""
    if cls is None or key not in cls.model_fields:
        return None
    members = models_in(cls.model_fields[key].annotation)
    return members[0] if len(members) == 1 else None


def _flat(d: Any, prefix: str = "") -> list[str]:
    if not isinstance(d, dict) or not d:
        return [prefix] if prefix else []
    return [p for k, v in d.items() for p in [f"{prefix}{k}", *_flat(v, f"{prefix}{k}.")]]


def compose(
    *sources: Source,
    overrides: Sequence[str] = (),
    cls: type[BaseModel] | None = None,
    presets: Path | None = None,
    relative_to: Path | None = None,
    flag: str = "--set",
) -> tuple[dict[str, Any], dict[str, str]]:
    """The composition pipeline (the module's three rules): `sources` in order, then
    `overrides`. Returns the merged plain dict and, for each dotted path, the label of the layer
    that set it last (`""`: the source the user named; `"*"`: the last layer). `cls` (the spec
    class the result is for) lets a change of `kind` keep the shared fields; references resolve
    against `relative_to`, then the working dir, then `presets`; `flag` is how the overrides
    were given (errors name it: `--set`, `--task-set`)."""
    layers: list[Layer] = []
    for source in sources:
        if isinstance(source, tuple):
            label, data = source
            data = dict(data)
            layers += _extended(data.pop("extends", None), relative_to, (), label, presets)
            layers.append((label, data))
        else:
            layers += _layers(str(source), relative_to, (), "command line", presets)
    named = layers[-1][0]  # the file the user named (or its preset), before any override
    for item in overrides:
        layers.append(_override(item, flag))
    merged: dict[str, Any] = {}
    provenance: dict[str, str] = {}
    for label, data in layers:
        try:
            merged = OmegaConf.to_container(OmegaConf.merge(drop_switched(merged, data, cls), data))
        except (OmegaConfBaseException, TypeError, ValueError) as e:  # TypeError: a list over a mapping
            raise SpecError(label, "", _merge_problem(e, merged, data)) from None
        provenance.update({p: label for p in _flat(data)})
    try:
        resolved = OmegaConf.to_container(OmegaConf.create(merged), resolve=True)
    except OmegaConfBaseException as e:
        raise SpecError(layers[-1][0], "", f"interpolation: {str(e).splitlines()[0]}") from None
    provenance[""] = named
    provenance["*"] = layers[-1][0]
    return resolved, provenance


def _override(item: str, flag: str) -> Layer:
    """One `KEY=VALUE` override as a layer."""
    if "=" not in item:
        raise SpecError(f"{flag} {item}", "", f"expected KEY=VALUE, e.g. {flag} a.b=64")
    check_aliases(item.partition("=")[2], f"{flag} {item}")
    try:
        return f"{flag} {item}", OmegaConf.to_container(OmegaConf.from_dotlist([item]))
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"{flag} {item}", "", f"cannot parse: {problem}") from None


def _merge_problem(error: Exception, base: dict[str, Any], over: dict[str, Any], prefix: str = "") -> str:
    """Why a layer cannot merge: the first dotted path where a mapping meets a non-mapping."""
    for key, value in over.items():
        old = base.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            found = _merge_problem(error, old, value, f"{prefix}{key}.")
            if found:
                return found
        elif isinstance(old, dict) != isinstance(value, dict) and old is not None and value is not None:
            kinds = lambda v: "a mapping" if isinstance(v, dict) else type(v).__name__  # noqa: E731
            return f"{prefix}{key}: {kinds(value)} cannot replace {kinds(old)}"
    return "" if prefix else str(error).splitlines()[0]


def load_data(path: Path, spec: Any) -> Any:
    """A spec file that is data only (a run's or an export's saved spec.yaml / task.yaml): parsed
    and validated, with nothing honoured that reads elsewhere: `extends` (other files) and
    `${...}` interpolation (environment variables, other fields) are refused, never resolved.
    `spec` is a spec class or a discriminated union of them."""
    if path.is_symlink():
        raise SpecError(str(path), "", "is a symbolic link: a saved spec is read from its own directory only")
    data = read_yaml(path)
    if "extends" in data:
        raise SpecError(str(path), "extends", "a saved spec is data: it may not extend other files")
    for dotted, value in _leaves(data):
        if isinstance(value, str) and "${" in value:
            raise SpecError(str(path), dotted, "a saved spec is data: interpolation (${...}) is not resolved")
    cls = spec
    if not isinstance(spec, type):
        members = union_members(spec)
        if not isinstance(data.get("kind"), str) or data["kind"] not in members:
            raise SpecError(str(path), "kind", f"unknown kind {data.get('kind')!r} (one of: {', '.join(members)})")
        cls = members[data["kind"]]
    return validate(data, cls, {"": str(path)})


def _leaves(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(data, dict):
        return [leaf for k, v in data.items() for leaf in _leaves(v, f"{prefix}{k}.")]
    if isinstance(data, list):
        return [leaf for i, v in enumerate(data) for leaf in _leaves(v, f"{prefix}{i}.")]
    return [(prefix.rstrip(".") or "(top)", data)]


def load_spec(source: str | Path, overrides: Sequence[str] = (), cls: type[S] = ModelSpec) -> S:
    data, provenance = compose(source, overrides=overrides, cls=cls)
    return validate(data, cls, provenance)


def union_members(union: Any) -> dict[str, type[BaseModel]]:
    """kind tag -> spec class, for a discriminated union of specs (or any annotation holding
    one: Optional, Annotated); members without a `kind` are left out. The one lookup of a
    union's members by tag."""
    return {m.model_fields["kind"].default: m for m in models_in(union) if "kind" in m.model_fields}


def load_union(
    source: str | Path,
    union: Any,
    overrides: Sequence[str] = (),
    presets: Path | None = None,
    flag: str = "--set",
    what: str = "spec",
) -> BaseModel:
    """A spec of one kind of `union`: `source` is a kind name (its defaults), a preset in
    `presets`, or a YAML path; overrides (given with `flag`) apply on top. `what` names the spec
    in errors ("task": an unknown name lists the task kinds)."""
    members = union_members(union)
    if str(source) in members:
        data, provenance = compose((f"kind {source}", {"kind": str(source)}), overrides=overrides, flag=flag)
    else:
        looks_like_file = "/" in str(source) or str(source).endswith((".yaml", ".yml"))
        if presets is None and not looks_like_file and not Path(source).is_file():
            close = difflib.get_close_matches(str(source), list(members), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise SpecError(f"--{what}", "", f"no {what} kind or file '{source}' ({hint}kinds: {', '.join(members)})")
        data, provenance = compose(source, overrides=overrides, presets=presets, flag=flag)
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in members:
        reason = f"unknown kind {kind!r}" if kind is not None else "missing `kind`"
        raise SpecError(provenance[""], "kind", f"{reason} (expected one of: {', '.join(members)})")
    return validate(data, members[kind], provenance)


def validate(data: dict[str, Any], cls: type[S], provenance: dict[str, str] | None = None) -> S:
    """`cls.model_validate(data)`, with the first problem turned into a SpecError."""
    provenance = provenance or {"": "spec"}
    try:
        return cls.model_validate(_fill_kinds(cls, data))
    except ValidationError as err:
        errors = err.errors()
        path, reason = _describe(cls, errors[0])
        if len(errors) > 1:
            reason += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        # a broken cross-field rule is blamed on the layer that set that exact field, else on
        # the file the user named (the rule's other fields may come from anywhere)
        is_rule = isinstance((errors[0].get("ctx") or {}).get("error"), SpecRuleError)
        source = provenance.get(path, provenance[""]) if is_rule else _source_of(path, provenance)
        if is_rule and _is_preset(source):  # a preset's field, broken by what the user changed
            source = next((p for p in (provenance.get("*", ""), provenance[""]) if not _is_preset(p)), source)
        raise SpecError(source, path, reason) from None


def _fill_kinds(cls: type[BaseModel], data: Any) -> Any:
    """A sub-spec given without `kind` means the field default's kind with those fields changed
    (`--set norm.eps=1e-5` edits the default RMSNorm)."""
    if not isinstance(data, dict):
        return data
    out = dict(data)
    for name, field in cls.model_fields.items():
        value = out.get(name)
        if not isinstance(value, dict):
            continue
        members = models_in(field.annotation)
        if field.discriminator and "kind" not in value and isinstance(field.default, BaseModel):
            value = {"kind": field.default.kind, **value}
        tags = union_members(field.annotation)
        tag = value.get("kind")
        member = (tags.get(tag) if isinstance(tag, str) else None) if field.discriminator else None
        member = member if field.discriminator else (members[0] if len(members) == 1 else None)
        out[name] = _fill_kinds(member, value) if member is not None else value
    return out


def _is_preset(label: str) -> bool:
    """Whether a layer label is one of the shipped presets (a file the user did not write)."""
    try:
        return Path(label).resolve().is_relative_to(preset_dir().resolve())
    except (OSError, ValueError):
        return False


def _source_of(path: str, provenance: dict[str, str]) -> str:
    parts = path.split(".") if path else []
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in provenance:
            return provenance[".".join(parts[:i])]
    return provenance[""]


def models_in(annotation: Any) -> list[type[BaseModel]]:
    """The spec classes inside a field annotation (through Optional, Union, Annotated, list)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in get_args(annotation) for m in models_in(a)]


def _walk(cls: type[BaseModel], loc: tuple) -> tuple[list[str], type[BaseModel] | None]:
    """Pydantic loc -> spec path parts (union tags dropped), and the model holding the last part."""
    parts: list[str] = []
    model: type[BaseModel] | None = cls
    holder: type[BaseModel] | None = cls
    i = 0
    while i < len(loc):
        key = loc[i]
        parts.append(str(key))
        holder = model
        field = model.model_fields.get(key) if model is not None and isinstance(key, str) else None
        nxt: type[BaseModel] | None = None
        if field is not None:
            members = models_in(field.annotation)
            if field.discriminator and i + 1 < len(loc) and len(members) > 0:
                tag, i = loc[i + 1], i + 1
                nxt = union_members(field.annotation).get(tag) if isinstance(tag, str) else None
            elif len(members) == 1:
                nxt = members[0]
        elif isinstance(key, int):
            nxt = model
        model = nxt
        i += 1
    return parts, holder


def _describe(cls: type[BaseModel], e: dict) -> tuple[str, str]:
    parts, holder = _walk(cls, tuple(e["loc"]))
    path = ".".join(parts)
    kind = e["type"]
    if kind == "extra_forbidden":
        name = parts[-1]
        fields = list(holder.model_fields) if holder is not None else []
        close = difflib.get_close_matches(name, fields, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'?" if close else f"known fields: {', '.join(fields)}"
        return path, f"unknown field '{name}' ({hint})"
    if kind == "missing":
        return path, "required field is missing"
    cause = (e.get("ctx") or {}).get("error")
    if isinstance(cause, SpecRuleError):
        return ".".join(p for p in (path, cause.path) if p), cause.reason  # a rule: see _source_of
    if kind == "union_tag_invalid":
        return path, f"unknown kind '{e['ctx']['tag']}' (expected one of: {e['ctx']['expected_tags']})"
    if kind == "union_tag_not_found":
        return path, f"missing `kind` (expected one of: {e['ctx']['discriminator']})"
    msg = e["msg"].removeprefix("Value error, ")
    if "input" in e and not isinstance(e["input"], dict):
        msg += f" (got {e['input']!r})"
    return path, msg


def dump_spec(spec: BaseModel) -> str:
    """Fully resolved YAML (every default written) that `load_spec` reads back to an equal spec;
    in every mapping `kind` comes first."""
    return yaml.safe_dump(_kind_first(spec.model_dump(mode="json")), sort_keys=False)


def _kind_first(data: Any) -> Any:
    if isinstance(data, dict):
        ordered = {"kind": data["kind"]} if "kind" in data else {}
        return ordered | {k: _kind_first(v) for k, v in data.items() if k != "kind"}
    if isinstance(data, list):
        return [_kind_first(v) for v in data]
    return data
