"""Presets: sources in precedence, `extends` chains, explicit keys over a preset, and one clear line per mistake."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lpengine.cli import app
from lpengine.config import VideoParams, load_config
from lpengine.errors import ConfigError
from lpengine.presets import BUILTIN_DIR, check_files, load_library
from tests.conftest import write

BATCH = "inputs:\n  images: photos\naudio: voice.wav\n"


def _problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def test_builtins_are_valid_and_each_states_its_purpose() -> None:
    """A fresh install lists the built-ins, each with a purpose; calm and active carry the contract's meaning."""
    library = load_library()
    assert {"news-anchor", "presenter", "song", "song-smooth", "face-only"} <= set(library.names())
    assert all(p.description and p.definition.origin == "built-in" for p in library)
    assert library.get("news-anchor").params().template_id == "calm"  # type: ignore[union-attr]
    assert library.get("song").params().template_id == "active"  # type: ignore[union-attr]
    assert len(list(BUILTIN_DIR.glob("*.yaml"))) == len(library)


def test_explicit_keys_win_over_the_preset(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "b.yaml", BATCH + "video:\n  preset: song\n  mouth_move_strength: 0.4\n"))
    assert cfg.video == VideoParams(template_id="active", head_move_strength=0.9, mouth_move_strength=0.4)
    assert cfg.preset_context.batch_preset == "song"
    assert cfg.preset_context.batch_overrides == {"mouth_move_strength": 0.4}


def test_precedence_builtin_user_folder_block(tmp_path: Path, _own_user_presets: Path) -> None:
    """Each later source overrides an earlier one of the same name, and the library says which it replaced."""
    write(_own_user_presets / "song.yaml", "description: user song\nmouth_move_strength: 1.1\n")
    write(_own_user_presets / "mine.yaml", "description: user mine\nvideo_fps: 20\n")
    write(tmp_path / "presets" / "song.yaml", "description: folder song\nmouth_move_strength: 1.2\n")
    write(tmp_path / "presets" / "mine.yaml", "description: folder mine\nvideo_fps: 25\n")
    config = write(
        tmp_path / "b.yaml", BATCH + "presets:\n  song:\n    description: block song\n    mouth_move_strength: 0.3\n"
    )
    library = load_library(config=config)
    song, mine = library.get("song"), library.get("mine")
    assert song is not None and mine is not None
    assert (song.description, song.values["mouth_move_strength"]) == ("block song", 0.3)
    assert [d.origin for d in song.replaces] == ["built-in", "user", "folder"]
    assert (mine.definition.origin, mine.values) == ("folder", {"video_fps": 25})
    # --presets DIR replaces the folder beside the config
    other = tmp_path / "elsewhere"
    write(other / "mine.yaml", "video_fps: 16\n")
    assert load_library(config=config, presets_dir=other).get("mine").values == {"video_fps": 16}  # type: ignore[union-attr]
    # without a config: built-ins and the user's folder only
    assert load_library().get("mine").values == {"video_fps": 20}  # type: ignore[union-attr]


def test_extends_chain_and_provenance(tmp_path: Path) -> None:
    """A chain applies root first; each value records the preset and file that set it; a redefined base is
    followed by everything extending it."""
    config = write(
        tmp_path / "b.yaml",
        BATCH + "presets:\n"
        "  base: {template_id: calm, eye_move_freq: 0.2}\n"
        "  middle: {extends: base, eye_move_freq: 0.4, video_fps: 20}\n"
        "  top: {extends: middle, video_fps: 30}\n"
        "  song: {extends: base}\n"
        "  loud: {extends: song-smooth}\n",
    )
    library = load_library(config=config)
    top = library.get("top")
    assert top is not None
    assert top.chain == ("top", "middle", "base")
    assert top.values == {"template_id": "calm", "eye_move_freq": 0.4, "video_fps": 30}
    assert top.provenance["template_id"].startswith("base (config ")
    assert top.provenance["eye_move_freq"].startswith("middle (")
    assert top.provenance["video_fps"].startswith("top (")
    # song-smooth (built-in) extends `song`, which this batch redefined
    assert library.get("loud").values == {"template_id": "calm", "eye_move_freq": 0.2, "video_fps": 30}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        ("  me: {extends: me}\n", "b.yaml: line 5: presets.me.extends: `me → me` is a cycle"),
        ("  a: {extends: b}\n  b: {extends: a}\n", "presets.a.extends: `a → b → a` is a cycle"),
        (
            "  a: {extends: nwes-anchor}\n",
            "b.yaml: line 5: presets.a.extends: unknown preset 'nwes-anchor'; did you mean",
        ),
        (
            "  a: {mouth_move_strength: 1.6}\n",
            "b.yaml: line 5: presets.a.mouth_move_strength: Input should be less than",
        ),
        ("  a: {video_fps: 31}\n", "presets.a.video_fps: Input should be less than or equal to 30"),
        (
            "  a:\n    head_move_strenght: 0.2\n",
            "b.yaml: line 6: presets.a.head_move_strenght: unknown key; did you mean",
        ),
        ("  ../up: {}\n", "b.yaml: line 5: presets: preset name '../up' is not allowed"),
        ("  'a/b': {}\n", "preset name 'a/b' is not allowed"),
        ("  a: 3\n", "presets.a: must be a mapping"),
    ],
)
def test_bad_presets_in_the_config_name_file_line_and_field(tmp_path: Path, block: str, expected: str) -> None:
    problems = _problems(write(tmp_path / "b.yaml", BATCH + "presets:\n" + block))
    assert any(expected in p for p in problems), problems
    assert all(p.startswith(str(tmp_path / "b.yaml")) for p in problems), problems


def test_unknown_batch_preset_is_refused_with_a_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path / "b.yaml", BATCH + "video:\n  preset: news_anchor\n")
    assert _problems(path) == [
        f"{path}: line 5: video.preset: unknown preset 'news_anchor'; did you mean `news-anchor`? known presets: "
        "face-only, news-anchor, presenter, song, song-smooth"
    ]


def test_bad_preset_files_are_refused_before_the_batch_starts(tmp_path: Path, _own_user_presets: Path) -> None:
    """A broken file in any source stops load_config (exit 2, nothing paid), naming that file and line."""
    bad = write(tmp_path / "presets" / "x.yaml", "description: x\n\ntemplate_id: wild\n")
    write(_own_user_presets / "bad name.yaml", "video_fps: 20\n")
    problems = _problems(write(tmp_path / "b.yaml", BATCH))
    assert any(
        p.startswith(f"{bad}: line 3: template_id: Input should be 'normal', 'calm' or 'active'") for p in problems
    )
    assert any("bad name.yaml: preset name 'bad name' is not allowed" in p for p in problems), problems
    missing = _problems(write(tmp_path / "c.yaml", BATCH + "presets_dir: nowhere\n"))
    assert any("presets_dir: " in p and "nowhere is not a folder" in p for p in missing), missing


def test_check_files_resolves_extends_across_the_files(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yaml", "extends: b\nvideo_fps: 20\n")
    b = write(tmp_path / "b.yaml", "extends: song\n")
    checked, problems = check_files([a, b])
    assert problems == []
    assert checked[0].values == {
        "template_id": "active",
        "video_fps": 20,
        "mouth_move_strength": 1.3,
        "head_move_strength": 0.9,
    }


def test_cli_list_show_validate_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    listed = runner.invoke(app, ["presets", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = {r["name"]: r for r in json.loads(listed.output)}
    assert rows["news-anchor"]["params"]["template_id"] == "calm"
    shown = runner.invoke(app, ["presets", "show", "song-smooth"])
    assert shown.exit_code == 0
    assert "extends      song" in shown.output
    assert "default (the preset does not set it)" in shown.output
    exported = runner.invoke(app, ["presets", "export", "song-smooth"])
    assert exported.exit_code == 0, exported.output
    assert runner.invoke(app, ["presets", "export", "song-smooth"]).exit_code == 2  # no silent overwrite
    text = (tmp_path / "song-smooth.yaml").read_text()
    assert "extends" not in text and "video_fps: 30" in text  # self-contained: the chain is flattened
    ok = runner.invoke(app, ["presets", "validate", "song-smooth.yaml"])
    assert ok.exit_code == 0 and "ok  song-smooth" in ok.output
    write(tmp_path / "bad.yaml", "eye_move_freq: 2\n")
    bad = runner.invoke(app, ["presets", "validate", "bad.yaml"])
    assert bad.exit_code == 2
    assert "bad.yaml: line 1: eye_move_freq: Input should be less than or equal to 1" in bad.output
    assert runner.invoke(app, ["presets", "show", "nope"]).exit_code == 2
