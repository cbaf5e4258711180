"""`lpengine presets …`: list, show, validate, export and save presets (the bodies; cli.py only mounts them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from lpengine.config import VideoParams
from lpengine.errors import ConfigError
from lpengine.presets import (
    BUILTIN_DIR,
    PARAMETERS,
    Preset,
    PresetLibrary,
    check_files,
    check_name,
    load_library,
    user_presets_dir,
)

EXIT_OK, EXIT_CONFIG = 0, 2

app = typer.Typer(
    name="presets",
    help="Named sets of video parameters (docs/presets.md).\n\n"
    "Examples:\n\n  lpengine presets list\n\n  lpengine presets show news-anchor\n\n"
    "  lpengine presets export news-anchor -o news-anchor.yaml",
    no_args_is_help=True,
)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="A batch YAML: include its presets/ folder and presets: block.")
]
PresetsOpt = Annotated[Path | None, typer.Option("--presets", help="A folder of preset files (NAME.yaml).")]


def _fail(lines: list[str]) -> typer.Exit:
    for line in lines:
        typer.echo(f"error: {line}", err=True)
    return typer.Exit(EXIT_CONFIG)


def _library(config: Path | None, presets: Path | None) -> PresetLibrary:
    try:
        return load_library(config=config, presets_dir=presets)
    except ConfigError as exc:
        raise _fail(exc.problems) from None


def _find(library: PresetLibrary, name: str) -> Preset:
    preset = library.get(name)
    if preset is None:
        raise _fail([library.unknown(name)])
    return preset


def preset_document(description: str, values: dict[str, Any], extends: str | None = None) -> str:
    """A preset file's text: what `export` and `save` write, and what every source reads."""
    data: dict[str, Any] = {"description": description} if description else {}
    if extends:
        data["extends"] = extends
    data.update({k: values[k] for k in PARAMETERS if k in values})
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False, width=1000)


@app.command("list")
def list_presets(
    config: ConfigOpt = None,
    presets: PresetsOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="A JSON array instead of a table.")] = False,
) -> None:
    """Every preset visible here, with its purpose and where it is defined."""
    library = _library(config, presets)
    if as_json:
        rows = [
            {
                "name": p.name,
                "description": p.description,
                "source": p.definition.origin,
                "file": p.definition.file,
                "extends": p.definition.spec.extends,
                "values": p.values,
                "params": p.params().model_dump(),
            }
            for p in library
        ]
        typer.echo(json.dumps(rows, ensure_ascii=False, indent=1))
        return
    width = max((len(p.name) for p in library), default=4)
    for p in library:
        shadow = f" (overrides {p.replaces[-1].origin})" if p.replaces else ""
        typer.echo(f"{p.name:<{width}}  [{p.definition.origin}{shadow}]  {p.description}")
    typer.echo(f"\nuser presets: {user_presets_dir()} · built-ins: {BUILTIN_DIR}")


@app.command()
def show(name: str, config: ConfigOpt = None, presets: PresetsOpt = None) -> None:
    """A preset's resolved values and where each one came from."""
    preset = _find(_library(config, presets), name)
    d = preset.definition
    typer.echo(f"{preset.name}: {preset.description}")
    typer.echo(f"  defined in   {d.origin} {d.file}")
    for earlier in reversed(preset.replaces):
        typer.echo(f"  overrides    {earlier.origin} {earlier.file}")
    if len(preset.chain) > 1:
        typer.echo(f"  extends      {' → '.join(preset.chain[1:])}")
    params = preset.params()
    for key in PARAMETERS:
        value = getattr(params, key)
        origin = preset.provenance.get(key, "default (the preset does not set it)")
        typer.echo(f"  {key:<20} {json.dumps(value):<8} ← {origin}")


@app.command()
def validate(files: Annotated[list[Path], typer.Argument(help="Preset files (NAME.yaml).")]) -> None:
    """Check preset files as a batch would (ranges, unknown keys, names, extends), without using them."""
    checked, problems = check_files(files)
    if problems:
        raise _fail(problems)
    for preset in checked:
        typer.echo(f"ok  {preset.name}  ({preset.definition.file}): {json.dumps(preset.values)}")


@app.command()
def export(
    name: str,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="File to write; default ./NAME.yaml.")] = None,
    config: ConfigOpt = None,
    presets: PresetsOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
) -> None:
    """Write a preset as one self-contained YAML file (its `extends` chain flattened) to share or drop into a
    presets/ folder."""
    preset = _find(_library(config, presets), name)
    target = output or Path(f"{preset.name}.yaml")
    _write(target, preset_document(preset.description, preset.values), force)
    typer.echo(f"wrote {target} (preset {preset.name}; another batch uses it from its presets/ folder)")


def _write(target: Path, text: str, force: bool) -> None:
    if target.exists() and not force:
        raise _fail([f"{target} exists; choose another name or pass --force to replace it"])
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise _fail([f"{target}: cannot write ({exc.strerror}); choose a writable folder"]) from None


def save_preset(
    name: str, description: str, values: dict[str, Any], to: Path | None, force: bool, *, extends: str | None = None
) -> Path:
    """Write a new preset file into the user's folder (or `to`) after checking it as any source would be."""
    if problem := check_name(name):
        raise _fail([problem])
    try:
        VideoParams.model_validate(values)
    except ValueError as exc:
        raise _fail([f"{name}: the values do not make a valid preset ({exc})"]) from None
    target = (to or user_presets_dir()) / f"{name}.yaml"
    _write(target, preset_document(description, values, extends), force)
    return target


@app.command()
def save(
    name: str,
    from_video: Annotated[
        Path | None, typer.Option("--from-video", help="An lpengine video: its recipe (MP4 tag) becomes the preset.")
    ] = None,
    from_sweep: Annotated[
        Path | None, typer.Option("--from-sweep", help="A sweep folder (OUTPUT/sweep); with --pick LABEL.")
    ] = None,
    pick: Annotated[str | None, typer.Option("--pick", help="The sweep column (combination label) to keep.")] = None,
    description: Annotated[str, typer.Option("--description", help="What the look is for.")] = "",
    to: Annotated[
        Path | None, typer.Option("--to", help="Folder to save into (a batch's presets/); default: your user folder.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing preset file.")] = False,
) -> None:
    """Save a look you liked as a preset: from a video's recipe, or from one column of a sweep's contact sheet.

    Examples: lpengine presets save warm --from-video out/anna.mp4 ·
    lpengine presets save warm --from-sweep out/sweep --pick mouth1.4_calm
    """
    if (from_video is None) == (from_sweep is None):
        raise _fail(["give exactly one of --from-video FILE or --from-sweep DIR --pick LABEL"])
    extends: str | None = None
    if from_video is not None:
        from lpengine.media import MediaError
        from lpengine.recipe_tags import read_recipe

        try:
            recipe = read_recipe(from_video)
        except MediaError as exc:
            raise _fail([str(exc)]) from None
        if recipe is None or not isinstance(recipe.get("params"), dict):
            raise _fail([f"{from_video}: carries no lpengine recipe (made elsewhere, or with output.recipe_tags off)"])
        values: dict[str, Any] = recipe["params"]
        origin = f"from {from_video.name}" + (f" (preset {recipe['preset']})" if recipe.get("preset") else "")
    else:
        assert from_sweep is not None
        try:
            picks = json.loads((from_sweep / "sweep.json").read_text(encoding="utf-8"))["picks"]
        except (OSError, ValueError, KeyError):
            raise _fail([f"{from_sweep}: no sweep.json here; give the sweep folder (OUTPUT/sweep)"]) from None
        if pick not in picks:
            raise _fail([f"--pick: {pick!r} is not a column of this sweep; columns: {', '.join(picks)}"])
        chosen = picks[pick]
        extends = chosen.get("extends")
        values = chosen["values"] if extends else chosen["params"]
        origin = f"sweep column {pick}"
    target = save_preset(name, description or origin, values, to, force, extends=extends)
    typer.echo(f"saved preset {name} to {target}; use it with `video: {{preset: {name}}}`")
