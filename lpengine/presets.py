"""Presets: named sets of video parameters that a team shares, picks per batch or per item, and compares in sweeps.

A preset is any subset of the six `video:` parameters, a description and optionally `extends: OTHER`. It is
validated exactly like `video:` (the same pydantic ranges, the same unknown-key messages from `config`), but with
the file's line numbers, because preset files travel between people and "which line" is the first question.

Sources, later overriding earlier ones of the same name (docs/presets.md):
1. built-ins shipped with lpengine (`lpengine/assets/presets/`);
2. the user's folder (`platformdirs` user config dir, e.g. `~/.config/lpengine/presets/`);
3. the batch's folder: `presets_dir` / `--presets DIR`, or `presets/` beside the batch config;
4. the `presets:` block of the batch config.

`extends` names are looked up in the merged set, so a batch may redefine `news-anchor` and every preset extending
it follows. Every value knows where it came from (`Preset.provenance`), which `lpengine presets show` prints.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs
import yaml
from pydantic import ValidationError

from lpengine.config import BatchConfig, PresetSpec, VideoParams, format_validation_error
from lpengine.errors import ConfigError

__all__ = [
    "BUILTIN_DIR",
    "PARAMETERS",
    "Preset",
    "PresetDef",
    "PresetLibrary",
    "apply_presets",
    "check_files",
    "check_name",
    "item_recipe",
    "key_lines",
    "load_library",
    "read_preset_file",
    "recipe_text",
    "unknown_preset",
    "user_presets_dir",
]

BUILTIN_DIR = Path(__file__).parent / "assets" / "presets"
PARAMETERS: tuple[str, ...] = tuple(VideoParams.model_fields)
"""The video parameters a preset may set, in the contract's order."""
_META = ("description", "extends")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SUFFIXES = (".yaml", ".yml")


def user_presets_dir() -> Path:
    """The user's own presets, shared by every batch on this account (`XDG_CONFIG_HOME` is honoured)."""
    return Path(platformdirs.user_config_dir("lpengine")) / "presets"


def check_name(name: object) -> str | None:
    """Why `name` cannot name a preset, or None. Names become file names (`export`, `save`), so no path
    characters, no leading dot, nothing a shell or a file system would read differently."""
    if not isinstance(name, str):
        return f"a preset name must be text (got {name!r})"
    if _NAME.fullmatch(name) and ".." not in name:
        return None
    return (
        f"preset name {name!r} is not allowed: use 1-64 letters, digits, `-`, `_` or `.`, starting with a letter "
        "or digit (no `/`, `\\`, spaces or `..`)"
    )


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Line number (1-based) of every mapping key in a YAML document, by key path; {} if it does not parse."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    lines: dict[tuple[str, ...], int] = {}
    stack: list[tuple[tuple[str, ...], yaml.Node | None]] = [((), root)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    child = (*path, str(key.value))
                    lines.setdefault(child, key.start_mark.line + 1)
                    stack.append((child, value))
    return lines


@dataclass(frozen=True, slots=True)
class PresetDef:
    """One definition of a preset, as written in one source."""

    name: str
    spec: PresetSpec
    origin: str
    """`built-in`, `user`, `folder` or `config`."""
    file: str
    field: str = ""
    """Its path inside the file (`presets.NAME` in a batch config; empty for a preset file)."""
    line: int | None = None
    """Line of its `extends` key, where an `extends` problem is reported."""

    @property
    def values(self) -> dict[str, Any]:
        return self.spec.model_dump(exclude_none=True, exclude=set(_META))

    @property
    def where(self) -> str:
        return f"{self.file}: line {self.line}" if self.line else self.file

    def describe(self) -> str:
        return f"{self.origin} {self.file}"


@dataclass(frozen=True, slots=True)
class Preset:
    """A preset with its `extends` chain applied."""

    name: str
    description: str
    definition: PresetDef
    values: dict[str, Any]
    """The parameters the chain sets, in contract order; the others take their defaults."""
    provenance: dict[str, str]
    """For each of `values`: which preset of the chain set it, and in which file."""
    chain: tuple[str, ...]
    """This preset, then what it extends, and so on."""
    replaces: tuple[PresetDef, ...]
    """Definitions of the same name from earlier sources, which this one overrides."""

    def params(self, overrides: Mapping[str, Any] | None = None) -> VideoParams:
        return VideoParams.model_validate({**self.values, **(overrides or {})})


class PresetLibrary:
    """Every known preset, resolved; built by `load_library`."""

    def __init__(self, presets: dict[str, Preset]) -> None:
        self._presets = dict(sorted(presets.items()))

    def __iter__(self) -> Iterator[Preset]:
        return iter(self._presets.values())

    def __contains__(self, name: object) -> bool:
        return name in self._presets

    def __len__(self) -> int:
        return len(self._presets)

    def names(self) -> list[str]:
        return list(self._presets)

    def get(self, name: str) -> Preset | None:
        return self._presets.get(name)

    def unknown(self, name: object) -> str:
        return unknown_preset(name, self.names())

    def values(self) -> dict[str, dict[str, Any]]:
        return {p.name: dict(p.values) for p in self}


def unknown_preset(name: object, known: list[str]) -> str:
    """The message for a preset name that is not known: the closest known one, then all of them."""
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f"did you mean `{close[0]}`? " if close else ""
    return f"unknown preset {str(name)!r}; {hint}known presets: {', '.join(sorted(known)) or '(none)'}"


def item_recipe(
    config: BatchConfig, preset: str | None, written: Mapping[str, Any]
) -> tuple[VideoParams, str | None, dict[str, Any]]:
    """An item's parameters, preset and the values written over the preset, from a manifest row (or a sweep).

    A row that names a preset takes that whole look: the preset's values, then the row's own columns (the batch's
    `video:` does not apply to it). A row without one starts from the batch's `video:` and its preset. Raises
    `KeyError` with the message for a preset name that is not known."""
    context = config.preset_context
    if preset is not None:
        if preset not in context.values:
            raise KeyError(unknown_preset(preset, list(context.values)))
        return VideoParams.model_validate({**context.values[preset], **written}), preset, dict(written)
    params = config.video.model_copy(update=dict(written))
    return params, context.batch_preset, {**context.batch_overrides, **written}


_SHORT = {
    "template_id": "",
    "eye_move_freq": "eye ",
    "video_fps": "fps ",
    "mouth_move_strength": "mouth ",
    "paste_back": "paste_back ",
    "head_move_strength": "head ",
}


def recipe_text(preset: str | None, params: Mapping[str, Any] | None) -> str:
    """One short line for people: `news-anchor: calm, eye 0.5, fps 24, mouth 1.0, paste_back true, head 0.5`."""
    values = ", ".join(
        f"{_SHORT.get(k, k + ' ')}{str(v).lower() if isinstance(v, bool) else v}" for k, v in (params or {}).items()
    )
    return f"{preset}: {values}" if preset else values


# -- reading the sources -------------------------------------------------------------------------------------------


def _at(file: str, lines: Mapping[tuple[str, ...], int], path: tuple[str, ...]) -> str:
    """`FILE: line N` for a key path whose line is known (the form of every config message), else `FILE`."""
    return f"{file}: line {lines[path]}" if path in lines else file


def read_preset_file(path: Path, origin: str, problems: list[str]) -> PresetDef | None:
    """One preset file (`NAME.yaml`, the name being the file's stem); problems are appended, None returned."""
    file = str(path)
    if problem := check_name(path.stem):
        problems.append(f"{file}: {problem}; rename the file")
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        problems.append(f"{file}: not UTF-8 text; save the file as UTF-8")
        return None
    except OSError as exc:
        problems.append(f"{file}: cannot read the file ({exc.strerror}); check the path and permissions")
        return None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{file}: line {mark.line + 1}" if mark is not None else file
        problems.append(f"{where}: {getattr(exc, 'problem', None) or 'invalid YAML'}; fix the YAML syntax")
        return None
    if not isinstance(raw, dict):
        allowed = ", ".join((*_META, *PARAMETERS))
        problems.append(f"{file}: a preset file must be a mapping of keys ({allowed})")
        return None
    return _definition(path.stem, raw, origin, file, (), key_lines(text), problems)


def _definition(
    name: str,
    raw: dict[str, Any],
    origin: str,
    file: str,
    prefix: tuple[str, ...],
    lines: Mapping[tuple[str, ...], int],
    problems: list[str],
) -> PresetDef | None:
    try:
        spec = PresetSpec.model_validate(raw)
    except ValidationError as exc:
        problems.extend(format_validation_error(exc, file, root=PresetSpec, prefix=prefix, lines=lines))
        return None
    field = ".".join(prefix)
    if spec.extends is not None and (problem := check_name(spec.extends)):
        where = _at(file, lines, (*prefix, "extends"))
        problems.append(f"{where}: {field + '.' if field else ''}extends: {problem}")
        return None
    return PresetDef(name, spec, origin, file, field, lines.get((*prefix, "extends")) or lines.get(prefix))


def _folder(folder: Path, origin: str, problems: list[str]) -> list[PresetDef]:
    if not folder.is_dir():
        return []
    defs = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in _SUFFIXES and not p.name.startswith(".")):
        definition = read_preset_file(path, origin, problems)
        if definition is not None:
            defs.append(definition)
    return defs


def _block(
    block: Mapping[Any, Any], file: str, lines: Mapping[tuple[str, ...], int], problems: list[str]
) -> list[PresetDef]:
    defs = []
    for name, raw in block.items():
        where = _at(file, lines, ("presets", str(name)))
        if problem := check_name(name):
            problems.append(f"{where}: presets: {problem}")
            continue
        if not isinstance(raw, dict):
            problems.append(f"{where}: presets.{name}: must be a mapping (description, extends, parameters)")
            continue
        definition = _definition(name, raw, "config", file, ("presets", name), lines, problems)
        if definition is not None:
            defs.append(definition)
    return defs


def _resolve(defs: list[PresetDef], problems: list[str]) -> dict[str, Preset]:
    """Later definitions replace earlier ones of the same name; then each `extends` chain is applied."""
    latest: dict[str, PresetDef] = {}
    earlier: dict[str, list[PresetDef]] = {}
    for d in defs:
        if d.name in latest:
            earlier.setdefault(d.name, []).append(latest[d.name])
        latest[d.name] = d
    resolved: dict[str, Preset] = {}
    broken: set[str] = set()

    def resolve(name: str) -> Preset | None:
        if name in resolved or name in broken:
            return resolved.get(name)
        chain: list[PresetDef] = []
        current: PresetDef | None = latest[name]
        while current is not None:
            chain.append(current)
            parent = current.spec.extends
            if parent is None:
                break
            head = chain[0]
            label = f"{head.where}: {head.field + '.' if head.field else ''}extends"
            names = [c.name for c in chain]
            if parent in names:
                cycle = " → ".join([*names, parent])
                problems.append(f"{label}: `{cycle}` is a cycle; a preset cannot extend itself, even through others")
                broken.update(names)  # one message per cycle, not one per member
                return None
            if parent not in latest:
                close = difflib.get_close_matches(parent, list(latest), n=1)
                hint = f"did you mean `{close[0]}`? " if close else ""
                problems.append(
                    f"{current.where}: {current.field + '.' if current.field else ''}extends: unknown preset "
                    f"{parent!r}; {hint}known: {', '.join(sorted(latest))}"
                )
                broken.add(name)
                return None
            current = latest[parent]
        values: dict[str, Any] = {}
        provenance: dict[str, str] = {}
        for d in reversed(chain):  # the root first, so each preset's own values win over what it extends
            for key, value in d.values.items():
                values[key] = value
                provenance[key] = f"{d.name} ({d.describe()})"
        order = {k: i for i, k in enumerate(PARAMETERS)}
        head = chain[0]
        preset = Preset(
            name=name,
            description=head.spec.description or next((d.spec.description for d in chain if d.spec.description), ""),
            definition=head,
            values=dict(sorted(values.items(), key=lambda kv: order[kv[0]])),
            provenance=provenance,
            chain=tuple(d.name for d in chain),
            replaces=tuple(earlier.get(name, ())),
        )
        resolved[name] = preset
        return preset

    for name in latest:
        resolve(name)
    return resolved


def _collect(
    *,
    base_dir: Path | None,
    presets_dir: Path | None,
    block: Mapping[Any, Any] | None,
    file: str,
    lines: Mapping[tuple[str, ...], int],
    problems: list[str],
) -> PresetLibrary:
    defs = _folder(BUILTIN_DIR, "built-in", problems)
    defs += _folder(user_presets_dir(), "user", problems)
    if presets_dir is not None:
        if not presets_dir.is_dir():
            where = f"{file}: " if file else ""
            problems.append(f"{where}presets_dir: {presets_dir} is not a folder; check the path (or --presets DIR)")
        defs += _folder(presets_dir, "folder", problems)
    elif base_dir is not None:
        defs += _folder(base_dir / "presets", "folder", problems)
    if block:
        defs += _block(block, file, lines, problems)
    return PresetLibrary(_resolve(defs, problems))


def check_files(paths: list[Path]) -> tuple[list[Preset], list[str]]:
    """Preset files checked as a batch would read them: their `extends` may name each other, a built-in or one of
    the user's presets. Returns the resolved presets and the problems."""
    problems: list[str] = []
    defs = [d for path in paths if (d := read_preset_file(path, "file", problems)) is not None]
    shared = _folder(BUILTIN_DIR, "built-in", problems) + _folder(user_presets_dir(), "user", problems)
    resolved = _resolve([*shared, *defs], problems)
    return [resolved[d.name] for d in defs if d.name in resolved], problems


def load_library(
    *,
    config: Path | None = None,
    presets_dir: Path | None = None,
) -> PresetLibrary:
    """Every preset visible to a batch config (or, without one, the built-ins, the user's, and `presets_dir`).

    Raises `ConfigError` listing every problem at once.
    """
    problems: list[str] = []
    block: Mapping[Any, Any] | None = None
    lines: dict[tuple[str, ...], int] = {}
    base_dir = None
    if config is not None:
        from lpengine.config import load_config

        cfg = load_config(config, overrides={"presets_dir": str(presets_dir.absolute())} if presets_dir else None)
        text = config.read_text(encoding="utf-8")
        lines = key_lines(text)
        block = {name: spec.model_dump(exclude_defaults=True) for name, spec in cfg.presets.items()}
        base_dir = cfg.base_dir
        presets_dir = cfg.resolve(cfg.presets_dir) if cfg.presets_dir else None
    library = _collect(
        base_dir=base_dir, presets_dir=presets_dir, block=block, file=str(config or ""), lines=lines, problems=problems
    )
    if problems:
        raise ConfigError(problems)
    return library


def apply_presets(data: dict[str, Any], *, file: str, text: str, base_dir: Path, problems: list[str]) -> None:
    """`load_config`'s step: gather and check every preset source, then turn `video: {preset: NAME, …}` into plain
    parameters (the keys written beside the preset win) and record what was resolved in `preset_context`."""
    lines = key_lines(text)
    raw_dir = data.get("presets_dir")
    presets_dir = None
    if isinstance(raw_dir, str) and raw_dir:
        path = Path(raw_dir).expanduser()
        presets_dir = path if path.is_absolute() else base_dir / path
    block = data.get("presets")
    before = len(problems)
    library = _collect(
        base_dir=base_dir,
        presets_dir=presets_dir,
        block=block if isinstance(block, dict) else None,
        file=file,
        lines=lines,
        problems=problems,
    )
    if len(problems) > before and isinstance(block, dict):
        data.pop("presets")  # already reported with line numbers; validation would only repeat it
    context: dict[str, Any] = {"values": library.values()}
    video = data.get("video")
    if isinstance(video, dict) and "preset" in video:
        video = dict(video)
        name = video.pop("preset")
        where = _at(file, lines, ("video", "preset"))
        preset = library.get(name) if isinstance(name, str) else None
        if preset is None:
            problems.append(f"{where}: video.preset: {library.unknown(name)}")
        else:
            context["batch_preset"] = name
            context["batch_overrides"] = video
            video = {**preset.values, **video}
        data["video"] = video
    data["preset_context"] = context
