"""Config loading: every problem named with file, dotted field and what is allowed; secrets only from env/.env."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lpengine.config import BatchConfig, VideoParams, load_config, load_secrets
from lpengine.errors import ConfigError
from tests.conftest import write

GOOD = """
inputs:
  images: photos
audio: voice.wav
video:
  template_id: calm
  video_fps: 25
"""


def test_good_config_resolves_paths_relative_to_the_file(tmp_path: Path) -> None:
    """Relative paths in the YAML mean the config's folder, not the cwd."""
    cfg = load_config(write(tmp_path / "b.yaml", GOOD))
    assert cfg.video.template_id == "calm"
    assert cfg.video.video_fps == 25
    assert cfg.video.head_move_strength == 0.7  # documented default (§3)
    assert cfg.output_dir == tmp_path / "output"
    assert cfg.state_path == tmp_path / "output" / ".lpengine" / "state.db"


def test_every_problem_is_one_line_with_file_field_and_allowed(tmp_path: Path) -> None:
    """Typos and out-of-range values are all reported at once, each naming the field."""
    path = write(
        tmp_path / "b.yaml",
        GOOD
        + """  eye_move_frq: 0.3
  mouth_move_strength: 2
api:
  rate_limits:
    detect_qps: -1
concurrency:
  poll: 0
""",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = info.value.problems
    assert len(problems) == 4
    text = "\n".join(problems)
    assert f"{path}: video.eye_move_frq: unknown key; did you mean `eye_move_freq`?" in text
    assert "video.mouth_move_strength: Input should be less than or equal to 1.5" in text
    assert "api.rate_limits.detect_qps: Input should be greater than 0" in text
    assert "concurrency.poll: Input should be greater than or equal to 1" in text


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("video:\n  template_id: wild\n", "video.template_id: Input should be 'normal', 'calm' or 'active'"),
        ("video:\n  video_fps: 24.5\n", "video.video_fps: Input should be a valid integer"),
        ("video:\n  paste_back: maybe\n", "video.paste_back: Input should be a valid boolean"),
        ("storage:\n  backend: ftp\n", "storage: unknown storage backend; allowed: fileserver, s3, dashscope_temp"),
        ("storage:\n  backend: s3\n", "storage.bucket: required field is missing"),
        ("colour: red\n", "colour: unknown key; allowed keys: analysis, api, audio, concurrency"),
    ],
)
def test_specific_messages(tmp_path: Path, snippet: str, expected: str) -> None:
    """Each kind of mistake gets a message that says what is allowed."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path / "b.yaml", GOOD + snippet))
    assert any(expected in p for p in info.value.problems), info.value.problems


def test_malformed_yaml_names_line_and_column(tmp_path: Path) -> None:
    """A YAML syntax error points at the line."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path / "b.yaml", "inputs:\n  images: [a\n"))
    assert len(info.value.problems) == 1
    assert "line " in info.value.problems[0] and "fix the YAML syntax" in info.value.problems[0]


def test_missing_file_and_non_mapping(tmp_path: Path) -> None:
    """No traceback for a missing file or a list at the top level."""
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path / "l.yaml", "- a\n- b\n"))


def test_env_interpolation_from_environment_and_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`${VAR}` comes from the environment first, then .env; a missing one is a named problem."""
    write(tmp_path / ".env", "PHOTOS=from-dotenv\nDASHSCOPE_API_KEY=sk-from-dotenv-123\n")
    monkeypatch.setenv("OUT", "from-env")
    cfg = load_config(write(tmp_path / "b.yaml", "inputs:\n  images: ${PHOTOS}\noutput:\n  dir: ${OUT}\n"))
    assert cfg.inputs.images == "from-dotenv"
    assert cfg.output.dir == Path("from-env")
    secrets = load_secrets(tmp_path)
    assert secrets.api_key is not None and secrets.api_key.get_secret_value() == "sk-from-dotenv-123"
    assert "sk-from-dotenv" not in repr(secrets)
    with pytest.raises(ConfigError, match=r"inputs.images: environment variable \$\{NOPE\} is not set"):
        load_config(write(tmp_path / "c.yaml", "inputs:\n  images: ${NOPE}\n"))
    cfg = load_config(write(tmp_path / "d.yaml", "inputs:\n  images: ${NOPE:-fallback}\n"))
    assert cfg.inputs.images == "fallback"


def test_inputs_need_exactly_one_source(tmp_path: Path) -> None:
    """Folder and manifest together (or neither) is refused with the fix."""
    with pytest.raises(ConfigError, match="give exactly one of"):
        load_config(write(tmp_path / "b.yaml", "inputs:\n  images: a\n  manifest: m.csv\n"))


def test_shipped_configs_are_valid() -> None:
    """configs/batch.yaml and configs/demo.yaml load as shipped."""
    root = Path(__file__).resolve().parents[2] / "configs"
    for name in ("batch.yaml", "demo.yaml"):
        assert isinstance(load_config(root / name), BatchConfig)


@given(
    st.floats(allow_nan=False, allow_infinity=False, min_value=-10, max_value=10),
    st.integers(min_value=0, max_value=60),
)
def test_video_params_accept_exactly_the_documented_ranges(eye: float, fps: int) -> None:
    """Property: the model accepts a value iff the contract (§3) allows it."""
    allowed = 0 <= eye <= 1 and 15 <= fps <= 30
    try:
        VideoParams(eye_move_freq=eye, video_fps=fps)
    except ValueError:
        assert not allowed
    else:
        assert allowed
