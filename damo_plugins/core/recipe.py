"""Recipes: the YAML/JSON file that lists a model and the steps to apply to it.

Recipes are data, never code: they are read with ``yaml.safe_load`` semantics (JSON is read
by the same parser), a model is named by a registered builder or a file path, and each step
names a pass provided by an installed plugin. Every problem is reported with its place in
the file (``recipe.yaml:7: steps[1].prune: unknown option 'ratoi' (did you mean 'ratio'?)``).

Paths in a recipe file are relative to the file's folder, wherever the command runs from:
``model``, ``output`` and every step option whose ``Config`` field is marked as a path
(``Field(..., json_schema_extra={"path": "data"})``, or ``"model"`` for an option that
names a model like ``model`` does). Absolute paths and keywords (``synthetic``,
``generated:8``, calibration source names) stay as written. A recipe given as a mapping
(the Python API, verbs) is taken relative to the working directory, as its caller's paths
are.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from damo_plugins.core.errors import DamoError
from damo_plugins.core.io import check_input_file
from damo_plugins.core.manager import PluginManager, suggest


class Recipe(BaseModel):
    """The top level of a recipe file."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="registered builder name, or a .pt/.pth/.onnx/.xml file")
    arch: str | None = Field(None, description="builder for a weights-only checkpoint")
    model_args: dict[str, Any] = Field(default_factory=dict, description="builder arguments")
    input_shape: list[int] | None = Field(None, description="e.g. [1, 3, 640, 640]")
    steps: list[Any] = Field(default_factory=list)
    output: str | None = Field(None, description="output folder (default runs/<recipe name>)")
    seed: int = 0

    @field_validator("input_shape")
    @classmethod
    def _positive(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(d <= 0 for d in v)):
            raise ValueError("every dimension must be a positive integer")
        return v


@dataclass
class Step:
    index: int
    name: str
    config: Any  # validated pass config
    pass_cls: type


@dataclass
class LoadedRecipe:
    recipe: Recipe
    steps: list[Step]
    source: str
    base_dir: Path


class _Locator:
    """Maps a path of keys/indices to a line in the YAML source."""

    def __init__(self, node: Any, source: str) -> None:
        self.node = node
        self.source = source

    def where(self, loc: Sequence[Any]) -> str:
        node = self.node
        line = node.start_mark.line + 1 if node is not None else 1
        for key in loc:
            if isinstance(node, yaml.MappingNode):
                for k, v in node.value:
                    if k.value == str(key):
                        node, line = v, k.start_mark.line + 1
                        break
                else:
                    break
            elif (
                isinstance(node, yaml.SequenceNode)
                and isinstance(key, int)
                and key < len(node.value)
            ):
                node = node.value[key]
                line = node.start_mark.line + 1
            else:
                break
        return f"{self.source}:{line}"


def _fmt_loc(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _first_error(exc: ValidationError, allowed: Sequence[str]) -> tuple[tuple[Any, ...], str]:
    err = exc.errors()[0]
    loc = tuple(err.get("loc", ()))
    if err.get("type") == "extra_forbidden" and loc:
        bad = str(loc[-1])
        return loc, f"unknown option '{bad}' ({suggest(bad, allowed)})"
    return loc, err.get("msg", "invalid value")


#: bounds on what a recipe may expand to (a recipe is a page of text, never megabytes)
MAX_NODES = 100_000
MAX_DEPTH = 64


def parse_text(text: str, source: str = "<recipe>") -> tuple[Any, _Locator]:
    """Parse recipe text (YAML or JSON) within bounds; problems name the line.

    YAML aliases may expand exponentially (a 1 KB "billion laughs" document), so the
    composed node graph is measured *with aliases expanded* before anything is built from
    it; nesting deeper than :data:`MAX_DEPTH` and duplicate keys (where YAML silently keeps
    the last) are refused.
    """
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        _check_bounds(node, source)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise DamoError(f"{where}: recipe is not valid YAML/JSON: {problem}") from exc
    except RecursionError:
        raise DamoError(
            f"{source}: recipe is nested too deeply", f"at most {MAX_DEPTH} levels"
        ) from None
    return data, _Locator(node, source)


def _check_bounds(root: Any, source: str) -> None:
    """Expanded size, depth and duplicate keys of a composed YAML node graph."""
    if root is None:
        return
    sizes: dict[int, int] = {}
    # iterative post-order walk: (node, depth, children done?)
    stack: list[tuple[Any, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, done = stack.pop()
        if depth > MAX_DEPTH:
            raise DamoError(
                f"{source}:{node.start_mark.line + 1}: recipe is nested too deeply",
                f"at most {MAX_DEPTH} levels",
            )
        children = _children(node)
        if done or not children:
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(node)] > MAX_NODES:
                raise DamoError(
                    f"{source}: recipe expands to more than {MAX_NODES} values "
                    "(YAML aliases/anchors multiply what they repeat)",
                    "write the recipe out without nested aliases",
                )
            continue
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key, _ in node.value:
                if isinstance(key, yaml.ScalarNode):
                    if key.value in seen:
                        raise DamoError(
                            f"{source}:{key.start_mark.line + 1}: key '{key.value}' is given twice",
                            "keep one (YAML would silently use the last)",
                        )
                    seen.add(key.value)
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in children if id(c) not in sizes)


def _children(node: Any) -> list[Any]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def load_recipe(
    path_or_data: str | Path | Mapping[str, Any],
    manager: PluginManager,
    *,
    source: str | None = None,
) -> LoadedRecipe:
    """Read and validate a recipe (a file path, or an already-parsed mapping).

    A file's relative paths are made relative to its folder (see the module docstring).
    """
    from_file = not isinstance(path_or_data, Mapping)
    if isinstance(path_or_data, Mapping):
        data, loc = dict(path_or_data), _Locator(None, source or "<recipe>")
        base = Path.cwd()
    else:
        path = check_input_file(path_or_data, "recipe")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DamoError(f"{path}: recipe is not UTF-8 text") from exc
        data, loc = parse_text(text, source or str(path))
        base = path.parent
    if not isinstance(data, Mapping):
        raise DamoError(f"{loc.source}: a recipe must be a mapping with 'model' and 'steps'")
    try:
        recipe = Recipe(**{str(k): v for k, v in data.items()})
    except ValidationError as exc:
        where, msg = _first_error(exc, list(Recipe.model_fields))
        raise DamoError(f"{loc.where(where)}: {_fmt_loc(where) or 'recipe'}: {msg}") from None
    except TypeError as exc:  # non-string keys and the like
        raise DamoError(f"{loc.source}: invalid recipe: {exc}") from None
    if from_file and recipe.output is not None:
        recipe.output = str(_under(base, recipe.output))
    steps = [
        _parse_step(i, raw, manager, loc, base if from_file else None)
        for i, raw in enumerate(recipe.steps)
    ]
    return LoadedRecipe(recipe, steps, loc.source, base)


# ------------------------------------------------------------------ relative paths
#: model file suffixes: a relative ``model`` with one of these is a path, never a name
MODEL_SUFFIXES = (".pt", ".pth", ".onnx", ".xml", ".bin")
#: keywords a data option may hold instead of a path (besides calibration source names)
DATA_KEYWORDS = ("synthetic", "generated")
#: keys whose values are paths inside a mapping-valued data option ({coco: F, images: D})
DATA_PATH_KEYS = ("coco", "images", "numpy", "path", "file", "folder", "dir", "data")


def _under(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def resolve_model_path(spec: str, base: Path) -> str:
    """``spec`` relative to ``base`` when it names a model file, else unchanged.

    A registered builder (``damo-yolo-s``) has no model suffix and is no file next to the
    recipe; anything else is a path, resolved whether or not it exists so that a missing
    file is reported where the user meant it.
    """
    p = Path(spec).expanduser()
    if p.is_absolute():
        return str(p)
    if p.suffix.lower() in MODEL_SUFFIXES or (base / p).exists():
        return str(base / p)
    return spec


def _data_keyword(value: str, manager: PluginManager) -> bool:
    """``synthetic``, ``generated``, ``generated:8``, ``images`` ...: not a path."""
    head = value.split(":", 1)[0]
    return "/" not in value and (head in DATA_KEYWORDS or head in manager.names("calibration"))


def _resolve_data(value: Any, base: Path, manager: PluginManager) -> Any:
    """A data option's paths relative to ``base``; keywords and non-strings unchanged."""
    if isinstance(value, str):
        if not value or _data_keyword(value, manager):
            return value
        return str(_under(base, value))
    if isinstance(value, Mapping):
        return {
            k: _resolve_data(v, base, manager) if str(k) in DATA_PATH_KEYS else v
            for k, v in value.items()
        }
    return value


def path_kind(field: Any) -> str | None:
    """``"data"``/``"model"`` when a ``Config`` field holds a path (its ``json_schema_extra``
    says ``{"path": ...}``), else ``None``."""
    extra = getattr(field, "json_schema_extra", None)
    if isinstance(extra, Mapping) and extra.get("path") in ("data", "model"):
        return str(extra["path"])
    return None


def _resolve_options(
    options: Mapping[str, Any], config_cls: Any, base: Path, manager: PluginManager
) -> dict[str, Any]:
    """A step's options with every path-valued one relative to the recipe's folder."""
    fields = getattr(config_cls, "model_fields", {})
    out = dict(options)
    for key, value in options.items():
        kind = path_kind(fields.get(key))
        if kind == "model" and isinstance(value, str):
            out[key] = resolve_model_path(value, base)
        elif kind == "data":
            out[key] = _resolve_data(value, base, manager)
    return out


def _parse_step(
    i: int, raw: Any, manager: PluginManager, loc: _Locator, base: Path | None = None
) -> Step:
    from damo_plugins.core.passes import ConfigError

    where = loc.where(("steps", i))
    if isinstance(raw, str):
        name, options = raw, {}
    elif isinstance(raw, Mapping) and len(raw) == 1:
        name, options = next(iter(raw.items()))
        options = {} if options is None else options
        if not isinstance(options, Mapping):
            raise DamoError(
                f"{where}: steps[{i}].{name}: options must be a mapping, not {type(options).__name__}"
            )
    else:
        raise DamoError(
            f"{where}: steps[{i}]: a step is a name or a one-key mapping 'name: {{options}}'"
        )
    name = str(name)
    known = manager.names("pass")
    if name not in known:
        clash = manager.clash("pass", name)
        if clash:
            raise DamoError(f"{where}: steps[{i}]: {clash}")
        raise DamoError(f"{where}: steps[{i}]: unknown step '{name}' ({suggest(name, known)})")
    pass_cls = manager.get_pass(name)
    options = {str(k): v for k, v in options.items()}
    if base is not None:
        options = _resolve_options(options, pass_cls.Config, base, manager)
    try:
        config = pass_cls.validate_config(options, manager)
    except ValidationError as exc:
        sub, msg = _first_error(exc, list(pass_cls.Config.model_fields))
        full = ("steps", i, name, *sub)
        raise DamoError(f"{loc.where(full)}: {_fmt_loc(full)}: {msg}") from None
    except ConfigError as exc:  # e.g. an option the step's adapter does not take
        full = ("steps", i, name, *exc.loc)
        raise DamoError(f"{loc.where(full)}: {_fmt_loc(full)}: {exc.message}", exc.hint) from None
    return Step(i, name, config, pass_cls)


def model_format(spec: str) -> str:
    """The format a model spec will load as, without loading it."""
    suffix = Path(spec).suffix.lower()
    return {".onnx": "onnx", ".xml": "openvino", ".bin": "openvino"}.get(suffix, "torch")


def check_chain(loaded: LoadedRecipe) -> list[str]:
    """Statically check that each step accepts what the previous one produces."""
    fmt = model_format(loaded.recipe.model)
    formats = [fmt]
    prev = "the model"
    for step in loaded.steps:
        accepts = step.pass_cls.accepts
        if fmt not in accepts:
            raise DamoError(
                f"{loaded.source}: steps[{step.index}]: step '{step.name}' cannot take a {fmt} "
                f"model (produced by {prev}); it accepts: {', '.join(accepts)}",
                "reorder the steps or add a conversion step",
            )
        fmt = step.pass_cls.output_format(step.config, fmt)
        formats.append(fmt)
        prev = f"step '{step.name}'"
    return formats


def closest(name: str, names: Sequence[str]) -> str | None:
    found = difflib.get_close_matches(name, list(names), n=1)
    return found[0] if found else None
