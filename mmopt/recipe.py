"""The recipe schema and the only code that reads YAML.

Every field is validated before any model loads; an error names the key path and its line in the file:
``recipe.yaml:7: passes[0].quantize.methd: unknown field``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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


class GateThresholds(Strict):
    min_cosine: float | None = Field(None, ge=-1, le=1)
    min_neighbor_agreement: float | None = Field(None, ge=0, le=1)
    max_weight_bytes: int | None = None
    max_peak_bytes: int | None = None

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
    passes: list[Pass] = Field([], description="the passes, in order, each built with its validated config")
    gates: Gates = Gates()
    output: str
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    base_dir: Path = Field(Path("."), exclude=True)

    def resolve(self, path: str) -> Path:
        """A path the recipe names (output, calibration files), a relative one taken against the recipe's folder.
        The model's own paths go through ``paths.resolve_spec``, which leaves ``pkg://`` paths to the adapter."""
        return resolve_path(path, self.base_dir)

    @property
    def output_path(self) -> Path:
        return self.resolve(self.output)


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


def _first_error(exc: ValidationError) -> dict:
    """An unknown key explains a 'missing' one (a typo), so report unknown keys first."""
    errors = exc.errors()
    return next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])


def parse_recipe(text: str, where: str = "recipe", base_dir: Path | None = None) -> Recipe:
    """Validate recipe ``text``; raise RecipeError naming the file, line and key path of the first problem."""
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

    def fail(path: tuple, message: str) -> RecipeError:
        line = located.line(path)
        return RecipeError(f"{where}{':' + str(line) if line else ''}: {_dotted(path)}: {message}")

    raw_passes = data.get("passes") or []
    if not isinstance(raw_passes, list):
        raise fail(("passes",), f"must be a list of {{pass_name: {{options}}}}, got {type(raw_passes).__name__}")
    passes = []
    for i, item in enumerate(raw_passes):
        if isinstance(item, str):
            item = {item: {}}
        if not isinstance(item, dict) or len(item) != 1:
            raise fail(("passes", i), "each pass is a one-key mapping such as `- cast: {dtype: float16}`")
        (name, options), = item.items()
        if name not in registry.PASSES:
            raise fail(("passes", i, name), f"unknown pass, known: {', '.join(sorted(registry.PASSES))}")
        options = {} if options is None else options
        if not isinstance(options, dict):
            raise fail(("passes", i, name), f"options must be a mapping, got {options!r}")
        pass_class = registry.pass_class(name)
        try:
            config = pass_class.Config.model_validate(options)
        except ValidationError as exc:
            err = _first_error(exc)
            raise fail(("passes", i, name) + tuple(err["loc"]), _message(err)) from None
        passes.append(pass_class(config))

    fields = {k: v for k, v in data.items() if k != "passes"}
    if "base_dir" in fields:
        raise fail(("base_dir",), "unknown field")
    try:
        recipe = Recipe.model_validate({**fields, "passes": [], "base_dir": base_dir or Path(".")})
    except ValidationError as exc:
        err = _first_error(exc)
        raise fail(tuple(err["loc"]), _message(err)) from None
    if not passes:
        raise fail(("passes",), "at least one pass is needed (e.g. `passes: [{cast: {dtype: float16}}]`)")
    return recipe.model_copy(update={"passes": passes})


def load_recipe(path: Path) -> Recipe:
    """Read and validate the recipe at ``path``."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"recipe not found: {path}")
    if path.is_dir():
        raise RecipeError(f"recipe must be a YAML file, got a folder: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a text file") from None
    return parse_recipe(text, where=str(path), base_dir=path.resolve().parent)
