"""Hostile and broken input: every bad file, row or setting gets one clear message naming it, with no traceback,
and the rest of the batch goes on. Nothing is paid for an input refused locally.

Runs through the real engine against the emulator (and the CLI in a subprocess for the cases that stop a run).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import unicodedata
import wave
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import BaseModel

from lpengine import Engine, ItemState, load_config
from lpengine.config import BatchConfig
from lpengine.emulator import EmulatorSettings, run_emulator
from lpengine.emulator.app import RunningEmulator
from lpengine.errors import ConfigError
from lpengine.media import verify_mp4
from lpengine.models import ItemResult, ItemSpec
from lpengine.plan import Namer, PlanProblem, iter_plan, safe_stem

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-test-hostile-0123456789"
VOICE = ROOT / "lpengine" / "assets" / "voice.wav"
SPEEDUP = 500.0
MB = 1024 * 1024
LONG_CJK_NAME = "照" * 100  # 300 bytes of UTF-8: a file name the filesystem cannot hold once ".mp4" is added


# -- making bad files -------------------------------------------------------------------------------------------


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose (valid, CRC-checked) header declares any size, followed by a tiny IDAT and IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def png_of(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height), 128).save(buf, "PNG")
    return buf.getvalue()


def wav(seconds: float, *, rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(rate)
        w.writeframes(bytes([128]) * int(seconds * rate))
    return buf.getvalue()


def sparse(path: Path, head: bytes, size: int) -> Path:
    """A file of `size` bytes that starts with `head` (sparse: costs no disk)."""
    with path.open("wb") as fh:
        fh.write(head)
        fh.truncate(size)
    return path


def bad_audio(folder: Path) -> dict[str, tuple[Path, str]]:
    """Each broken voice track and the words its message must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    broken = bytearray(wav(3.0))
    struct.pack_into("<I", broken, 40, 10 * len(broken))  # the data chunk promises more than the file has
    files = {
        "short": (folder / "short.wav", wav(0.5), "is 0.50 s long; audio must be longer than 1 s"),
        "long": (folder / "long.wav", wav(181.0), "is 181.0 s long; audio must be shorter than 180 s"),
        "text-mp3": (folder / "lyrics.mp3", b"These are the lyrics, not the song.\n" * 20, "text (not audio at all)"),
        "broken-wav": (folder / "broken.wav", bytes(broken), "is a broken WAV"),
    }
    out = {}
    for name, (path, data, words) in files.items():
        path.write_bytes(data)
        out[name] = (path, words)
    out["big"] = (sparse(folder / "big.wav", wav(2.0), 16 * MB), "is 16.0 MiB; audio files must be under 15 MiB")
    out["missing"] = (folder / "nowhere.wav", "does not exist")
    return out


@pytest.fixture(scope="module")
def portraits(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from lpengine.demo_assets import make_portraits

    return make_portraits(tmp_path_factory.mktemp("portraits"), 12)


@pytest.fixture
async def emulator() -> AsyncIterator[RunningEmulator]:
    settings = EmulatorSettings(api_keys=[KEY], speedup=SPEEDUP, video="stub", detector="rule")
    async with run_emulator(settings) as emu:
        yield emu


def write_config(tmp_path: Path, base_url: str, inputs: str, audio: Path | str = VOICE) -> Path:
    path = tmp_path / "batch.yaml"
    path.write_text(
        f"""
inputs:
  {inputs}
audio: {audio}
api:
  base_url: {base_url}
  speedup: {SPEEDUP}
  retry:
    initial_wait_s: 0
storage:
  backend: fileserver
output:
  dir: out
"""
    )
    return path


async def run(config: BatchConfig) -> list[ItemResult]:
    async with Engine(config, api_key=KEY) as engine:
        report = await engine.run()
    return list(report.items)


def assert_one_clear_line(result: ItemResult, names: str, words: str) -> None:
    assert result.state is ItemState.REJECTED_LOCALLY, result
    assert names in result.reason, (names, result.reason)
    assert words in result.reason, (words, result.reason)
    assert "\n" not in result.reason and "Traceback" not in result.reason
    assert "internal error" not in result.reason


def assert_no_internal_errors(out: Path) -> None:
    """The JSONL log saw no unexpected exception (those are logged as stage.internal_error with a traceback)."""
    for log in out.glob("lpengine-*.jsonl"):
        text = log.read_text()
        assert "stage.internal_error" not in text and "Traceback" not in text


# -- images -------------------------------------------------------------------------------------------------------


async def test_hostile_images_each_refused_with_one_line_and_the_rest_succeed(
    tmp_path: Path, portraits: list[Path], emulator: RunningEmulator, fast_retries: None
) -> None:
    """A folder of every kind of bad image next to good ones with awkward names: the good ones become videos with
    safe, distinct names; each bad one is refused locally, naming its file and what is wrong; nothing is paid."""
    photos = tmp_path / "photos"
    photos.mkdir()
    good = {
        "good.jpg": portraits[0],
        "张 三 照片.jpg": portraits[1],
        "  spaced   name .jpg": portraits[2],
        "SAME.jpg": portraits[3],
        "same.jpg": portraits[4],
        "same.png": portraits[5],  # a JPEG named .png: the real format decides
        "ünï cødé.jpeg": portraits[6],
    }
    for name, src in good.items():
        shutil.copy(src, photos / name)
    Image.open(portraits[7]).save(photos / "png-named.jpg", "PNG")  # a PNG named .jpg is fine
    good["png-named.jpg"] = portraits[7]

    data = portraits[8].read_bytes()
    bad: dict[str, str] = {}

    def put(name: str, content: bytes, words: str) -> None:
        (photos / name).write_bytes(content)
        bad[name] = words

    put("zero.jpg", b"", "is empty (0 bytes)")
    put("truncated.jpg", data[: len(data) // 2], "is a truncated JPEG")
    put("text.jpg", b"<html>not an image</html>\n", "unsupported format")
    put("side-4097.png", png_of(4097, 2100), "the longest side may be at most 4096 px")
    put("aspect-2.01.png", png_of(201, 100), "aspect ratio 2.01")
    gif = io.BytesIO()
    Image.new("RGB", (64, 64)).save(gif, "GIF")
    put("anim.gif", gif.getvalue(), "unsupported format GIF")
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)
    put("photo.heic", heic, "unsupported format HEIC/HEIF")
    put("heic-inside.jpg", heic, "unsupported format HEIC/HEIF")
    put("bomb.png", png_with_header(60000, 60000), "decompression bomb")
    sparse(photos / "huge.jpg", data[:1024], 10 * MB + 1)
    bad["huge.jpg"] = "image files must be under 10 MiB"
    (photos / "folder.jpg").mkdir()
    bad["folder.jpg"] = "is a directory"
    (photos / "dangling.jpg").symlink_to(photos / "deleted-since.jpg")
    bad["dangling.jpg"] = "does not exist"
    secret = tmp_path / "private" / "id-card.jpg"
    secret.parent.mkdir()
    shutil.copy(portraits[9], secret)
    (photos / "escape.jpg").symlink_to(secret)
    bad["escape.jpg"] = "symlink pointing outside the input folder"
    latin1 = os.fsdecode(b"caf\xe9.jpg")  # a name from an old Latin-1 system: not UTF-8
    shutil.copy(portraits[11], photos / latin1)
    bad["caf\\xe9.jpg"] = "file name is not valid UTF-8"
    os.mkfifo(photos / "pipe.jpg")  # reading it would block a worker forever
    bad["pipe.jpg"] = "is not a regular file"
    if os.geteuid() != 0:  # root reads anything
        locked = photos / "locked.jpg"
        shutil.copy(portraits[10], locked)
        locked.chmod(0)
        bad["locked.jpg"] = "permission denied"

    config = load_config(write_config(tmp_path, emulator.base_url, "images: photos"))
    results = await run(config)
    by_name = {Path(r.input).name: r for r in results}
    assert len(results) == len(by_name) == len(good) + len(bad)

    for name, words in bad.items():
        assert_one_clear_line(by_name[name], str(photos / name), words)
    for name in good:
        assert by_name[name].state is ItemState.SUCCEEDED, by_name[name]
    out = config.output_dir
    outputs = {Path(r.output).name for r in by_name.values() if r.output}
    assert outputs == {
        "good.mp4",
        "张 三 照片.mp4",
        "spaced name.mp4",
        "SAME.mp4",
        "same_jpg.mp4",
        "same_png.mp4",
        "ünï cødé.mp4",
        "png-named.mp4",
    }
    for video in out.glob("*.mp4"):
        verify_mp4(video)
    assert {p.name for p in out.glob("*.mp4")} == outputs  # all inside the output folder, none elsewhere
    stats = emulator.stats()
    assert stats.requests["detect"] == len(good)  # nothing was paid for a refused file
    assert stats.requests["submit"] == len(good)
    assert_no_internal_errors(out)


async def test_manifest_rows_bad_and_awkward_each_named_and_the_rest_succeed(
    tmp_path: Path, portraits: list[Path], emulator: RunningEmulator, fast_retries: None
) -> None:
    """A manifest with hostile rows: output names that try to leave the folder or collide, a name too long for the
    filesystem, missing files and columns, duplicates, wrong types, out-of-range values, and broken per-row audio.
    Each bad row is refused with its file:line (or file) and field; every good row becomes a video in the folder."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(7):
        shutil.copy(portraits[i], inputs / f"p{i}.jpg")
    audio = bad_audio(tmp_path / "in" / "audio")
    rows = [
        "image,audio,output,video_fps,eye_move_freq",
        "p0.jpg,,Dr. Who,,",  # line 2
        "p1.jpg,,../../escape,,",
        "p2.jpg,,/etc/passwd,,",
        "p3.jpg,,alice,,",
        "p4.jpg,,alice,,",  # the same output name twice
        f"p5.jpg,,{LONG_CJK_NAME},,",
        "missing.jpg,,,,",  # line 8
        "p0.jpg,,Dr. Who,,",  # duplicate of line 2
        ",,nobody,,",  # line 10: no image
        "p6.jpg,,,fast,",  # line 11: wrong type
        "p6.jpg,,,,2",  # line 12: out of range
        "p6.jpg,,,24,0.5,surplus",  # line 13: more values than columns
    ]
    rows.append("p6\x00.jpg,,nul,,")  # line 14: a NUL inside a path
    for name, (path, _) in audio.items():
        rows.append(f"p6.jpg,{path.relative_to(inputs)},{name},,")
    latin1_line = len(rows) + 1
    (inputs / "rows.csv").write_bytes(("\n".join(rows) + "\n").encode() + b"p6.jpg,,caf\xe9,,\n")
    config = load_config(write_config(tmp_path, emulator.base_url, "manifest: in/rows.csv"))
    items = await run(config)

    def by_source(image: str) -> list[ItemResult]:
        return [r for r in items if r.input.endswith(image)]

    out = config.output_dir
    succeeded = {Path(r.output).name for r in items if r.state is ItemState.SUCCEEDED and r.output}
    assert succeeded == {
        "Dr. Who.mp4",
        "escape.mp4",
        "passwd.mp4",
        "alice.mp4",
        "alice_jpg.mp4",
        f"{LONG_CJK_NAME[:60]}.mp4",  # capped at 180 bytes of UTF-8, room left for `.mp4` and `.part` forms
    }
    for video in out.iterdir():
        if video.suffix == ".mp4":
            verify_mp4(video)
    assert all(Path(r.output).parent == out for r in items if r.output)
    written = {p.name async for p in anyio.Path(tmp_path).iterdir()}
    assert written == {"in", "out", "batch.yaml"}  # nothing was written outside `out`

    manifest = "rows.csv"
    rejected = [r for r in items if r.state is ItemState.REJECTED_LOCALLY]
    reasons = [r.reason for r in rejected]
    expectations = [
        (str(inputs / "missing.jpg"), "does not exist"),
        (f"{manifest}:9", "duplicate of line 2"),
        (f"{manifest}:10", "missing `image` column or value"),
        (f"{manifest}:11", "video_fps"),
        (f"{manifest}:12", "eye_move_freq"),
        (f"{manifest}:13", "more values than header columns"),
        (str(inputs / "p6\x00.jpg"), "contains a NUL character"),
        (f"{manifest}:{latin1_line}", "not valid UTF-8"),
        *((str(path), words) for path, words in audio.values()),
    ]
    for names, words in expectations:
        matching = [r for r in rejected if names in r.reason and words in r.reason]
        assert len(matching) == 1, (names, words, reasons)
        assert_one_clear_line(matching[0], names, words)
    assert len(rejected) == len(expectations)
    assert len(items) == len(rows)  # one per data row, the Latin-1 one included
    assert by_source("p6.jpg") and all(r.state is ItemState.REJECTED_LOCALLY for r in by_source("p6.jpg"))
    stats = emulator.stats()
    assert stats.requests["submit"] == 6  # only the good rows were paid for
    assert_no_internal_errors(out)


# -- audio and config that stop the whole run ----------------------------------------------------------------------


@pytest.mark.parametrize("case", ["short", "long", "big", "text-mp3", "broken-wav", "missing"])
async def test_bad_default_audio_stops_the_run_with_one_line(tmp_path: Path, case: str) -> None:
    """The batch's own `audio:` is checked before anything is sent: ConfigError, one line naming `audio:`, the file
    and the problem."""
    path, words = bad_audio(tmp_path / "audio")[case]
    (tmp_path / "photos").mkdir()
    config = load_config(write_config(tmp_path, "http://127.0.0.1:9/api/v1", "images: photos", audio=path))
    with pytest.raises(ConfigError) as info:
        async with Engine(config, api_key=KEY):
            pass
    [line] = info.value.problems
    assert line.startswith(f"audio: {path}: ") and words in line


def lpengine(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lpengine", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
        env={**os.environ, "DASHSCOPE_API_KEY": KEY},
    )


@pytest.mark.parametrize(
    ("yaml_text", "words"),
    [
        ("inputs:\n  images: [photos\n", "fix the YAML syntax"),
        (
            "inputs:\n  images: photos\nvideo:\n  vidoe_fps: 25\n",
            "video.vidoe_fps: unknown key; did you mean `video_fps`?",
        ),
        ("inputs:\n  images: photos\nconcurrency:\n  upload: many\n", "concurrency.upload: Input should be"),
        ("inputs:\n  images: photos\nvideo:\n  mouth_move_strength: 9\n", "video.mouth_move_strength"),
        ("inputs:\n  manifest: nope.csv\n", "inputs.manifest:"),
        ("inputs:\n  images: photos\naudio: audio/short.wav\n", "is 0.50 s long"),
        ("inputs:\n  images: photos\naudio: audio/lyrics.mp3\n", "text (not audio at all)"),
        ("- just\n- a list\n", "top level must be a mapping"),
    ],
    ids=[
        "malformed",
        "unknown-key",
        "wrong-type",
        "out-of-range",
        "missing-manifest",
        "short-audio",
        "text-mp3",
        "list",
    ],
)
async def test_cli_refuses_bad_config_with_exit_2_and_no_traceback(tmp_path: Path, yaml_text: str, words: str) -> None:
    """`lpengine run` on a bad config or a bad default audio: exit 2, `error:` lines naming the file and field,
    never a traceback, nothing written but what it needs."""
    (tmp_path / "photos").mkdir()
    bad_audio(tmp_path / "audio")
    config = tmp_path / "batch.yaml"
    config.write_text(yaml_text)  # every problem is found before any request would be sent
    proc = await anyio.to_thread.run_sync(lambda: lpengine("run", str(config), cwd=tmp_path))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), proc.stderr
    assert any(words in line for line in lines), proc.stderr


async def test_cli_hostile_folder_exits_1_without_traceback(
    tmp_path: Path, portraits: list[Path], emulator: RunningEmulator
) -> None:
    """`lpengine run` over a folder with bad files: exit 1 (some items failed), the bad ones in the report with
    their reason, and no traceback anywhere (stderr, stdout, the JSONL log)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(portraits[0], photos / "ok.jpg")
    (photos / "zero.jpg").write_bytes(b"")
    (photos / "bomb.png").write_bytes(png_with_header(60000, 60000))
    (photos / "dangling.jpg").symlink_to(photos / "gone.jpg")
    config = write_config(tmp_path, emulator.base_url, "images: photos")
    proc = await anyio.to_thread.run_sync(
        lambda: lpengine("run", str(config), "--log-format", "json", "--log-level", "debug", cwd=tmp_path)
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["counts"] == {"succeeded": 1, "rejected_locally": 3}
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    reasons = {Path(i["input"]).name: i["reason"] for i in report["items"]}
    assert "is empty" in reasons["zero.jpg"] and "decompression bomb" in reasons["bomb.png"]
    assert "does not exist" in reasons["dangling.jpg"]
    assert_no_internal_errors(tmp_path / "out")


# -- properties: naming, manifests, config loading ------------------------------------------------------------------

NAME_MAX_BYTES = 255  # ext4, XFS, APFS, NTFS (in UTF-16 units, which is never more than UTF-8 bytes here)


def assert_safe_name(stem: str) -> None:
    """A stem that stays one harmless component in the output folder, in every form the engine writes."""
    root = Path("/out")
    for name in (f"{stem}.mp4", f".{stem}.mp4.0123abcd.part", f"{stem}-0123abcd.mp4"):
        assert len(name.encode()) <= NAME_MAX_BYTES, (len(name.encode()), stem)
        assert (root / name).resolve().parent == root
    assert stem and stem == stem.strip() and not stem.startswith(".") and not stem.endswith(".")
    assert not any(ch in stem for ch in '/\\\x00:*?"<>|')
    assert unicodedata.is_normalized("NFC", stem)


@given(st.text(max_size=400))
def test_safe_stem_fits_the_filesystem_and_is_stable(name: str) -> None:
    """Property: any text becomes a stem that fits a file name in all its forms (`.part`, task-id suffix), with no
    separator, NUL or leading/trailing dot or space; applying the rule twice changes nothing."""
    stem = safe_stem(name)
    assert_safe_name(stem)
    assert safe_stem(stem) == stem
    assert stem.casefold().rstrip("_") not in {"con", "prn", "aux", "nul"} or stem.endswith("_")


@given(st.lists(st.tuples(st.text(min_size=1, max_size=150), st.sampled_from(["", ".jpg", ".png", ".jpeg"]))))
def test_namer_names_stay_safe_with_suffixes(entries: list[tuple[str, str]]) -> None:
    """Property: with the `_png` / `_2` suffixes that make names unique, every name still fits and stays inside."""
    namer = Namer()
    names = [namer.assign(stem, suffix) for stem, suffix in entries]
    for name in names:
        assert_safe_name(name)
    assert len({n.casefold() for n in names}) == len(names)


def test_undecodable_names_never_reach_a_log_or_the_state_store() -> None:
    """A name holding bytes that are not UTF-8 (surrogates in Python) still gives a storable stem."""
    stem = safe_stem(os.fsdecode(b"caf\xe9 \xff.jpg"))
    stem.encode("utf-8")  # would raise on a lone surrogate
    assert_safe_name(stem)


cell = st.text(max_size=30) | st.sampled_from(["../x", "/etc/passwd", "a.mp4", "Dr. Who", "CON", "..", " ", "x\r\ny"])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(cell, cell, cell, cell), max_size=12))
def test_any_csv_manifest_plans_without_raising(rows: list[tuple[str, str, str, str]]) -> None:
    """Property: a CSV manifest of arbitrary cells plans into specs and per-row problems, never an exception; every
    output name is safe and unique, and every problem names its file and line."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        with (folder / "m.csv").open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["image", "output", "audio", "template_id"])
            writer.writerows(rows)
        (folder / "b.yaml").write_text("inputs:\n  manifest: m.csv\naudio: v.wav\n")
        plan = list(iter_plan(load_config(folder / "b.yaml")))
    specs = [p for p in plan if isinstance(p, ItemSpec)]
    names = [s.output_name for s in specs]
    for name in names:
        assert_safe_name(name)
    assert len({n.casefold() for n in names}) == len(names)
    assert all(isinstance(p, PlanProblem) and p.source.startswith("m.csv") for p in plan if p not in specs)


json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["image", "output", "x"]), inner),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None)
@given(st.lists(json_value | st.text(max_size=40), max_size=10))
def test_any_jsonl_manifest_plans_without_raising(lines: list[object]) -> None:
    """Property: JSONL lines of any JSON (or not JSON at all) plan into specs and problems, never an exception."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
        (folder / "m.jsonl").write_text(text.replace("\r", ""), encoding="utf-8")
        (folder / "b.yaml").write_text("inputs:\n  manifest: m.jsonl\naudio: v.wav\n")
        plan = list(iter_plan(load_config(folder / "b.yaml")))
    for entry in plan:
        if isinstance(entry, ItemSpec):
            assert_safe_name(entry.output_name)
        else:
            assert entry.source.startswith("m.jsonl:")


def _config_keys() -> list[str]:
    """Every field name of the config models, so random documents reach deep into validation."""
    from lpengine import config as config_module

    keys: set[str] = set()
    for value in vars(config_module).values():
        if isinstance(value, type) and issubclass(value, BaseModel):
            keys.update(value.model_fields)
    return sorted(keys | {"fileserver", "s3", "dashscope_temp", "url"})


yaml_key = st.sampled_from(_config_keys()) | st.text(max_size=10) | st.integers()
yaml_scalar = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["${NOPE}", "${HOME:-x}", "photos", "s3", "fileserver", "24", "-1", "1e999"])
)
yaml_value = st.recursive(
    yaml_scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(yaml_key, inner, max_size=4), max_leaves=24
)
yaml_document = st.dictionaries(yaml_key, yaml_value, max_size=8) | st.builds(
    lambda doc, inputs: {**doc, "inputs": inputs},
    st.dictionaries(st.sampled_from(_config_keys()), yaml_value, max_size=6),
    st.sampled_from([{"images": "photos"}, {"manifest": "m.csv"}, {"images": "a", "manifest": "b"}, {}]),
)


@settings(max_examples=200, deadline=None)
@given(yaml_document)
def test_random_yaml_mappings_load_or_raise_config_error_only(document: dict[object, object]) -> None:
    """Property: any YAML mapping either loads or raises ConfigError with one line per problem, each naming the
    file; never another exception (which the CLI would print as a traceback)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "b.yaml"
        path.write_text(yaml.safe_dump(document, allow_unicode=True), encoding="utf-8")
        try:
            load_config(path)
        except ConfigError as exc:
            assert exc.problems and all(p.startswith(f"{path}: ") for p in exc.problems), exc.problems


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_random_bytes_as_config_raise_config_error_only(data: bytes) -> None:
    """Property: any bytes in the config file (binary, broken YAML) give ConfigError, never another exception."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "b.yaml"
        path.write_bytes(data)
        with contextlib.suppress(ConfigError):
            load_config(path)


def test_deeply_nested_yaml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "b.yaml"
    path.write_text("inputs: " + "[" * 3000 + "]" * 3000 + "\n")
    with pytest.raises(ConfigError):
        load_config(path)


def test_output_override_on_a_non_mapping_output_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "b.yaml"
    path.write_text("inputs:\n  images: photos\noutput: 3\n")
    with pytest.raises(ConfigError):
        load_config(path, overrides={"output.dir": str(tmp_path / "out")})
