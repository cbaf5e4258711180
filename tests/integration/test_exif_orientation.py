"""Phone photos stored turned (EXIF Orientation), end to end against the emulator's Haar face detector, which, as the
service is assumed to, looks at the pixels as stored and ignores the tag: a face lying on its side is "No human face
detected.". What the emulator was paid for, and for which bytes, is counted by the emulator itself."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from PIL import Image

from lpengine import Engine, ItemState, load_config
from lpengine.emulator import EmulatorSettings, run_emulator
from lpengine.emulator.app import RunningEmulator
from lpengine.media import inspect_image, upright_image
from lpengine.state.sqlite import SqliteStateStore
from tests.helpers import write_batch
from tests.s3server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, S3Server, unique_bucket_name

pytestmark = pytest.mark.anyio

KEY = "sk-test-exif-orientation-0123456789"
SPEEDUP = 200.0
ORIENTATION = 0x0112
BACKENDS = ["dashscope_temp", "fileserver", "s3"]
upload_stage = importlib.import_module("lpengine.stages.upload")  # the package exports its `upload` function as well


@pytest.fixture
async def emulator() -> AsyncIterator[RunningEmulator]:
    async with run_emulator(
        EmulatorSettings(api_keys=[KEY], speedup=SPEEDUP, seed=3, video="stub", detector="haar")
    ) as emu:
        yield emu


@pytest.fixture(scope="module")
def upright_portraits(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from lpengine.demo_assets import make_portraits

    return make_portraits(tmp_path_factory.mktemp("faces"), 2)


def save_turned(upright: Path, dest: Path, orientation: int = 6) -> Path:
    """What a phone writes: the pixels as the sensor saw them (the portrait on its side) and the tag that turns them
    back for viewers (6: "turn 90° clockwise to view")."""
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    turns = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
    with Image.open(upright) as img:
        img.transpose(turns[orientation]).save(dest, "JPEG", quality=92, exif=exif.tobytes())
    return dest


def storage_block(backend: str, s3: S3Server | None) -> str:
    if backend != "s3":
        return f"\n  backend: {backend}"
    assert s3 is not None
    bucket = s3.create_bucket(unique_bucket_name())
    return (
        f"\n  backend: s3\n  endpoint_url: {s3.endpoint_url}\n  region: us-east-1\n  bucket: {bucket}"
        "\n  addressing_style: path"
    )


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_photo_stored_turned_is_sent_upright_so_its_face_is_found(
    tmp_path: Path,
    upright_portraits: list[Path],
    emulator: RunningEmulator,
    backend: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sent as stored, the portrait lies on its side and the paid detect answers "No human face detected.". The
    upright copy is what every backend publishes: detect passes, the video is made, and the service only ever saw
    the upright bytes. The copy is gone once the run ends."""
    s3: S3Server | None = None
    if backend == "s3":
        s3 = request.getfixturevalue("s3_server")
        monkeypatch.setenv("OSS_ACCESS_KEY_ID", ACCESS_KEY_ID)
        monkeypatch.setenv("OSS_ACCESS_KEY_SECRET", SECRET_ACCESS_KEY)
    photos = tmp_path / "photos"
    photos.mkdir()
    photo = save_turned(upright_portraits[0], photos / "phone.jpg")
    stored = photo.read_bytes()
    config = load_config(write_batch(tmp_path, emulator.base_url, SPEEDUP, storage=storage_block(backend, s3)))
    async with Engine(config, api_key=KEY) as engine:
        report = await engine.run()
    [result] = report.items
    assert result.state is ItemState.SUCCEEDED, result.reason
    sent = sha(upright_image(photo, sha(stored)))
    stats = emulator.stats()
    assert stats.detect_per_image == {sent: 1}
    assert stats.submissions_per_image == {sent: 1}
    assert photo.read_bytes() == stored  # the user's file is never touched
    assert not (tmp_path / "out" / ".lpengine" / "upright").exists()


@pytest.mark.parametrize("tag", ["none", "orientation 1"])
async def test_a_photo_stored_upright_is_sent_byte_for_byte(
    tmp_path: Path, upright_portraits: list[Path], emulator: RunningEmulator, tag: str
) -> None:
    """No tag, or Orientation 1: nothing is decoded or re-encoded; the service gets the file's own bytes."""
    photos = tmp_path / "photos"
    photos.mkdir()
    photo = photos / "a.jpg"
    if tag == "none":
        shutil.copy(upright_portraits[0], photo)
    else:
        exif = Image.Exif()
        exif[ORIENTATION] = 1
        with Image.open(upright_portraits[0]) as img:
            img.save(photo, "JPEG", quality=92, exif=exif.tobytes())
    config = load_config(write_batch(tmp_path, emulator.base_url, SPEEDUP))
    async with Engine(config, api_key=KEY) as engine:
        report = await engine.run()
    assert [r.state for r in report.items] == [ItemState.SUCCEEDED]
    assert emulator.stats().detect_per_image == {sha(photo.read_bytes()): 1}


async def test_a_batch_finished_before_upright_copies_is_not_paid_again(
    tmp_path: Path, upright_portraits: list[Path], emulator: RunningEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch run by a version that sent turned photos as stored: one turned photo failed its detect, one upright
    photo succeeded. Both are final, and an item's identity is its file as stored, so re-running it pays nothing,
    also when the files' stat stamps changed and they are read and checked again."""
    photos = tmp_path / "photos"
    photos.mkdir()
    save_turned(upright_portraits[0], photos / "turned.jpg")
    shutil.copy(upright_portraits[1], photos / "upright.jpg")
    config = load_config(write_batch(tmp_path, emulator.base_url, SPEEDUP))
    before = upload_stage.inspect_image
    with monkeypatch.context() as old_version:  # what older versions knew of a file: no orientation
        old_version.setattr(
            upload_stage, "inspect_image", lambda path: dataclasses.replace(before(path), orientation=1)
        )
        async with Engine(config, api_key=KEY) as engine:
            first = await engine.run()
    states = {os.path.basename(r.input): r.state for r in first.items}
    assert states == {"turned.jpg": ItemState.DETECT_FAILED, "upright.jpg": ItemState.SUCCEEDED}
    paid = emulator.stats()
    for photo in photos.iterdir():  # new stat stamps: the re-run reads, hashes and checks every file again
        os.utime(photo, (1_000_000_000, 1_000_000_000))
    async with Engine(config, api_key=KEY) as engine:
        second = await engine.run()
    assert {os.path.basename(r.input): (r.state, r.resumed) for r in second.items} == {
        "turned.jpg": (ItemState.DETECT_FAILED, True),
        "upright.jpg": (ItemState.SUCCEEDED, True),
    }
    assert second.cost_this_run_cny == 0
    now = emulator.stats()
    assert (now.detect_per_image, now.submissions_per_image) == (paid.detect_per_image, paid.submissions_per_image)


@pytest.mark.parametrize(
    ("recorded", "detects"), [("passed", 0), ("lost in a crash", 0), ("no face (lying on its side)", 1)]
)
async def test_a_face_verdict_for_the_photo_as_stored_stands_unless_it_was_no_face(
    tmp_path: Path, upright_portraits: list[Path], emulator: RunningEmulator, recorded: str, detects: int
) -> None:
    """An older version checked the turned photo as stored and was stopped before submitting. Its pass (or its
    lost answer) is not paid for again for the upright copy; its "no face" was about the picture on its side and
    does not condemn the copy, which is checked."""
    photos = tmp_path / "photos"
    photos.mkdir()
    photo = save_turned(upright_portraits[0], photos / "phone.jpg", orientation=8)
    config = load_config(write_batch(tmp_path, emulator.base_url, SPEEDUP))
    verdict = {"passed": True, "lost in a crash": None, "no face (lying on its side)": False}[recorded]
    config.state_path.parent.mkdir(parents=True)
    async with SqliteStateStore(config.state_path) as store:
        await store.put_detect(
            inspect_image(photo).sha256, verdict, "No human face detected." if verdict is False else ""
        )
    async with Engine(config, api_key=KEY) as engine:
        report = await engine.run()
    assert [r.state for r in report.items] == [ItemState.SUCCEEDED]
    assert sum(emulator.stats().detect_per_image.values()) == detects
