"""The recipe schema and the only code that reads YAML.

Every field is validated before any model loads; an error names the key path and its line in the file:
``recipe.yaml:7: passes[0].quantize.methd: unknown field``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, WithJsonSchema, field_validator
from typing_extensions import Annotated

from mmopt.core import ModelSpec
from mmopt.errors import RecipeError, first_line
from mmopt.passes.base import Pass
from mmopt.paths import resolve_path
from mmopt.units import parse_bytes


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CalibrationSpec(Strict):
    """Inputs used for fidelity (and for passes that learn from data)."""

    texts: str | None = Field(None, description="a text file, one text per line")
    images: str | None = Field(None, description="a folder of images any format PIL reads")
    captions: str | None = Field(None, description="image_file<TAB>caption per line")
    batch_size: int = Field(16, gt=0)
    num_samples: int = Field(128, gt=0)
    cache: bool = True


class ProfileShapes(Strict):
    """Shapes at which memory and latency are measured."""

    batch_size: int = Field(32, gt=0)
    image_size: int | None = Field(None, gt=0, description="default: the model's own")
    seq_len: int = Field(128, gt=0)


def _size(value: Any) -> int:
    return parse_bytes(value)


# A byte count as people write it: 1024, "200MiB", "1.5 GiB" (parsed by units.parse_bytes).
ByteSize = Annotated[int, WithJsonSchema({"anyOf": [
    {"type": "integer", "minimum": 0},
    {"type": "string", "pattern": r"^\s*[0-9]*\.?[0-9]+\s*([kKmMgGtT]i?[bB]|[bB])?\s*$"}]})]


class GateThresholds(Strict):
    min_cosine: float | None = Field(None, ge=-1, le=1, description="mean cosine vs the original, at least")
    min_neighbor_agreement: float | None = Field(None, ge=0, le=1,
                                                 description="share of items whose nearest neighbour is unchanged")
    min_top1_agreement: float | None = Field(None, ge=0, le=1,
                                             description="classifiers: share of items whose top-1 class (for a "
                                                         "one-output head: sign) is unchanged")
    max_weight_bytes: ByteSize | None = Field(None, description="weights in memory, at most (200MiB)")
    max_peak_bytes: ByteSize | None = Field(None, description="weights + largest part's peak activation, at most")

    @field_validator("max_weight_bytes", "max_peak_bytes", mode="before")
    @classmethod
    def _bytes(cls, v: Any) -> int | None:
        return None if v is None else _size(v)


class Gates(GateThresholds):
    """Conditions the optimized model must meet; a failing gate makes ``optimize`` exit 1."""

    max_size_ratio: float | None = Field(None, gt=0)
    parts: dict[str, GateThresholds] = {}


class Recipe(Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    model: ModelSpec
    parts: list[str] | None = Field(None, description="parts to keep and optimize (default: all)")
    calibration: CalibrationSpec | None = None
    profile: ProfileShapes = ProfileShapes()
    # the JSON Schema of the passes is built from each pass's config by recipe_json_schema
    passes: Annotated[list[Pass], WithJsonSchema({"type": "array"})] = Field(
        [], description="the passes, in order, each built with its validated config")
    gates: Gates = Gates()
    output: str
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    base_dir: Path = Field(Path("."), exclude=True)
    # where the recipe came from and the line of each key path, so checks made after parsing (``preflight``)
    # point into the file as the schema's errors do
    _where: str = PrivateAttr("recipe")
    _lines: dict = PrivateAttr(default_factory=dict)
    _from_set: list = PrivateAttr(default_factory=list)

    def locate(self, path: tuple) -> str:
        """``file:line: key.path`` for a key path (or ``--set ITEM: key.path`` when an override set it)."""
        source = next((item for p, item in self._from_set if path[:len(p)] == p), None)
        if source is not None:
            return f"--set {source}: {_dotted(path)}"
        line = next((self._lines[path[:end]] for end in range(len(path), -1, -1) if path[:end] in self._lines), None)
        return f"{self._where}{':' + str(line) if line else ''}: {_dotted(path)}"

    def resolve(self, path: str) -> Path:
        """A path the recipe names (output, calibration files), a relative one taken against the recipe's folder.
        The model's own paths go through ``paths.resolve_spec``, which leaves ``pkg://`` paths to the adapter."""
        return resolve_path(path, self.base_dir)

    @property
    def output_path(self) -> Path:
        return self.resolve(self.output)

    def identity(self) -> dict:
        """What decides the output's weights and figures, normalised (defaults filled in, passes as name + full
        config): recorded in mmopt.json so ``optimize --check`` can tell whether this recipe made the output.
        Left out: the output path, the gates (what ``--check`` re-evaluates) and the device."""
        data = self.model_dump(mode="json", include={"model", "parts", "calibration", "profile", "seed"})
        data["passes"] = [{step.name: step.config.model_dump(mode="json")} for step in self.passes]
        return data

    def fingerprint(self) -> str:
        """sha256 of ``identity()`` as canonical JSON."""
        import hashlib

        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()


# --- reading ---------------------------------------------------------------------------------------------

class _Located:
    """The line of every key path in a composed YAML tree, so errors can point into the file."""

    def __init__(self, loader: yaml.SafeLoader) -> None:
        self.loader = loader
        self.lines: dict[tuple, int] = {}

    def walk(self, node: yaml.Node, path: tuple = ()) -> None:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.loader.construct_object(key_node)
                if isinstance(key, (str, int, float, bool)):
                    self.lines[path + (key,)] = key_node.start_mark.line + 1
                    self.walk(value_node, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.walk(item, path + (i,))

    def line(self, path: tuple) -> int | None:
        for end in range(len(path), -1, -1):
            if path[:end] in self.lines:
                return self.lines[path[:end]]
        return None


def _dotted(path: tuple) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        text = str(part)
        if not text.isprintable() or text != text.strip() or not text:   # a key of "\n" stays on one line
            text = repr(text)
        out += f".{text}" if out else text
    return out or "(top level)"


def _message(err: dict) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required field is missing"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    got = err.get("input")
    if kind not in ("value_error",) and not isinstance(got, (dict, list)):
        return f"{msg}, got {got!r}"
    return msg


def _ordered_errors(exc: ValidationError) -> list[dict]:
    """An unknown key explains a 'missing' one (a typo), so unknown keys come first."""
    errors = exc.errors()
    return sorted(errors, key=lambda e: e["type"] != "extra_forbidden")


# --- overrides (--set KEY=VALUE, --output) ---------------------------------------------------------------

def parse_overrides(values: list[str]) -> list[tuple[tuple, Any, str]]:
    """``["passes.0.quantize.method=nf4"]`` -> [(("passes", 0, "quantize", "method"), "nf4", text)]; each VALUE
    is read as YAML (``0.3`` a number, ``[a, b]`` a list, ``nf4`` a string)."""
    out = []
    for text in values:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key or any(not piece for piece in key.split(".")):
            raise RecipeError(f"--set {text!r}: expected KEY=VALUE, e.g. passes.0.quantize.method=nf4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise RecipeError(f"--set {text!r}: the value is not valid YAML ({str(exc).splitlines()[0]})") from None
        out.append((tuple(int(p) if p.isdigit() else p for p in key.split(".")), value, text))
    return out


def _apply_override(data: dict, path: tuple, value: Any, text: str) -> None:
    """Set ``data[path] = value``, creating mappings on the way (a pass written as a bare name, ``- cast``, is
    opened into ``{cast: {}}``); list indices must exist, or be the next free one."""
    node: Any = data
    for depth, key in enumerate(path):
        last = depth == len(path) - 1
        where = _dotted(path[:depth]) if depth else "the recipe"
        if isinstance(node, list):
            if not isinstance(key, int) or key > len(node):
                raise RecipeError(f"--set {text}: {where} is a list of {len(node)}; "
                                  f"{key!r} is not an index of it (or the next one, {len(node)})")
            if key == len(node):
                node.append({})
            if last:
                node[key] = value
                return
            if isinstance(node[key], str):           # `- cast` is `- cast: {}`
                node[key] = {node[key]: {}}
        elif isinstance(node, dict):
            if last:
                node[key] = value
                return
            if node.get(key) is None:
                node[key] = [] if isinstance(path[depth + 1], int) else {}
        else:
            raise RecipeError(f"--set {text}: {where} is {node!r}, which has no {key!r}")
        node = node[key]


# --- parsing ---------------------------------------------------------------------------------------------

def parse_recipe(text: str, where: str = "recipe", base_dir: Path | None = None,
                 overrides: list[str] | None = None) -> Recipe:
    """Validate recipe ``text`` (with ``--set`` ``overrides`` applied); raise one RecipeError listing every
    problem, each naming the file, line and key path (or the ``--set`` it came from)."""
    from mmopt import registry

    try:
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as exc:        # unprintable characters are refused by the reader itself
        raise RecipeError(f"{where}: malformed YAML: {first_line(exc)}") from None
    located = _Located(loader)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
        if node is not None:
            located.walk(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or first_line(exc)
        raise RecipeError(f"{where}{at}: malformed YAML: {problem}") from None
    finally:
        loader.dispose()
    if node is None:
        raise RecipeError(f"{where}: the recipe is empty", hint="a recipe needs at least model: and output:")
    if not isinstance(data, dict):
        raise RecipeError(f"{where}:{located.line(())}: the top level must be a mapping of keys, "
                          f"got {type(data).__name__}")
    applied = parse_overrides(overrides or [])
    for path, value, item in applied:
        _apply_override(data, path, value, item)

    problems: list[str] = []

    def fail(path: tuple, message: str) -> None:
        source = next((item for p, _, item in applied if path[:len(p)] == p), None)
        if source is not None:
            problems.append(f"--set {source}: {_dotted(path)}: {message}")
            return
        line = located.line(path)
        problems.append(f"{where}{':' + str(line) if line else ''}: {_dotted(path)}: {message}")

    raw_passes = data.get("passes") or []
    if not isinstance(raw_passes, list):
        fail(("passes",), f"must be a list of {{pass_name: {{options}}}}, got {type(raw_passes).__name__}")
        raw_passes = []
    passes = []
    for i, item in enumerate(raw_passes):
        if isinstance(item, str):
            item = {item: {}}
        if not isinstance(item, dict) or len(item) != 1:
            fail(("passes", i), "each pass is a one-key mapping such as `- cast: {dtype: float16}`")
            continue
        (name, options), = item.items()
        if name not in registry.PASSES:
            fail(("passes", i, name), f"unknown pass, known: {', '.join(sorted(registry.PASSES))}")
            continue
        options = {} if options is None else options
        if not isinstance(options, dict):
            fail(("passes", i, name), f"options must be a mapping, got {options!r}")
            continue
        pass_class = registry.pass_class(name)
        try:
            passes.append(pass_class(pass_class.Config.model_validate(options)))
        except ValidationError as exc:
            for err in _ordered_errors(exc):
                fail(("passes", i, name) + tuple(err["loc"]), _message(err))

    fields = {k: v for k, v in data.items() if k != "passes"}
    if "base_dir" in fields:
        fail(("base_dir",), "unknown field")
        fields.pop("base_dir")
    recipe = None
    try:
        recipe = Recipe.model_validate({**fields, "passes": [], "base_dir": base_dir or Path(".")})
    except ValidationError as exc:
        for err in _ordered_errors(exc):
            fail(tuple(err["loc"]), _message(err))
    if not data.get("passes"):
        fail(("passes",), "at least one pass is needed (e.g. `passes: [{cast: {dtype: float16}}]`)")
    if problems:
        raise RecipeError("\n".join(dict.fromkeys(problems)))
    recipe = recipe.model_copy(update={"passes": passes})
    recipe._where, recipe._lines = where, dict(located.lines)
    recipe._from_set = [(p, item) for p, _, item in applied]
    return recipe


def load_recipe(path: Path, overrides: list[str] | None = None) -> Recipe:
    """Read and validate the recipe at ``path``, with ``--set`` ``overrides`` applied."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"recipe not found: {path}")
    if path.is_dir():
        raise RecipeError(f"recipe must be a YAML file, got a folder: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a text file") from None
    return parse_recipe(text, where=str(path), base_dir=path.resolve().parent, overrides=overrides)


# --- for people and editors: the pass catalogue and the JSON Schema -----------------------------------------

def pass_options(config_cls: type[BaseModel], prefix: str = "") -> list[dict]:
    """Every option of a pass config (nested option groups flattened as ``distill.steps``): name, type words,
    default and description."""
    rows = []
    for name, info in config_cls.model_fields.items():
        nested = _model_in(info.annotation)
        if nested is not None:
            rows.append({"option": prefix + name, "type": "options", "default": _default_words(info),
                         "description": info.description or nested.__doc__ or ""})
            rows += pass_options(nested, prefix=f"{prefix}{name}.")
            continue
        rows.append({"option": prefix + name, "type": _type_words(info.annotation), "default": _default_words(info),
                     "description": info.description or ""})
    return rows


def _model_in(annotation: Any) -> type[BaseModel] | None:
    import typing

    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _type_words(annotation: Any) -> str:
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_words(a) for a in args if a is not type(None)) + " (optional)"
    if origin in (list, tuple):
        return f"list of {_type_words(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if origin is Annotated:
        return _type_words(args[0])
    return getattr(annotation, "__name__", str(annotation))


def _default_words(info: Any) -> str:
    from pydantic_core import PydanticUndefined

    if info.default_factory is not None:
        value = info.default_factory()
    elif info.default is PydanticUndefined:
        return "(required)"
    else:
        value = info.default
    if isinstance(value, BaseModel):
        return "(see below)"
    return "-" if value is None else json.dumps(value, default=str)


def recipe_json_schema() -> dict:
    """The JSON Schema (draft 2020-12) of a recipe file, every pass's options included."""
    from mmopt import registry

    schema = Recipe.model_json_schema()
    schema["properties"].pop("base_dir", None)
    defs = schema.setdefault("$defs", {})
    items = []
    for name in sorted(registry.PASSES):
        options = registry.pass_class(name).Config.model_json_schema()
        # each pass's nested definitions live under its own name, so two passes may both have a "Recover"
        text = json.dumps(options).replace('"#/$defs/', f'"#/$defs/{name}.')
        options = json.loads(text)
        defs.update({f"{name}.{key}": value for key, value in options.pop("$defs", {}).items()})
        defs[f"{name}.options"] = options
        items.append({"type": "object", "additionalProperties": False, "required": [name],
                      "properties": {name: {"anyOf": [{"$ref": f"#/$defs/{name}.options"}, {"type": "null"}]}}})
        items.append({"const": name})
    schema["properties"]["passes"] = {
        "type": "array", "minItems": 1, "items": {"oneOf": items},
        "description": "passes applied in order; each is a one-key mapping {pass_name: {options}} or a bare name"}
    schema["required"] = sorted(set(schema.get("required", [])) | {"passes"})
    return {**schema, "$schema": "https://json-schema.org/draft/2020-12/schema", "title": "mmopt recipe"}
