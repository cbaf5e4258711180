"""A batch's inputs as they arrive from a browser: limits first, then the engine's own local checks, per file.

Nothing here trusts the upload: a file's name only labels it in messages (it never becomes a path component
unchecked), its type is what its bytes are (`lpengine.media`, the checks every run makes), and each file, the
number of files and the whole body are capped while streaming, so a hostile or mistaken upload costs at most the
caps in disk and never reaches a paid request.
"""

from __future__ import annotations

import json
import re
import shutil
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from aiohttp import BodyPartReader, web
from pydantic import ValidationError

from lpengine.config import VideoParams
from lpengine.media import AUDIO_MAX_BYTES, IMAGE_MAX_BYTES, MediaError, inspect_audio, inspect_image

__all__ = ["MAX_IMAGES", "MAX_TEXT_BYTES", "Estimate", "FileProblem", "Intake", "UploadRefused", "read_intake"]

MAX_IMAGES = 500
"""Photos per upload. Bigger batches name a folder on the server instead (no browser upload of that size is
pleasant, and the limit bounds what one request can make the console store)."""
MAX_TEXT_BYTES = 64 * 1024
_MIB = 1024 * 1024
_CHUNK = 256 * 1024
_BAD_NAME = re.compile(r"[\x00-\x1f\x7f/\\]")


class UploadRefused(Exception):
    """The upload as a whole is refused (too many files, bad parameters): one message, nothing kept."""

    def __init__(self, message: str, problems: list[FileProblem] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.problems = problems or []


@dataclass(frozen=True, slots=True)
class FileProblem:
    name: str
    problem: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "problem": self.problem}


@dataclass(frozen=True, slots=True)
class Estimate:
    """What a fresh batch of these files would send and cost: the dry run's arithmetic on the checked files."""

    images: int
    detect_calls: int
    submit_calls: int
    video_seconds: float
    cost_cny: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "calls": self.detect_calls + self.submit_calls,
            "detect_calls": self.detect_calls,
            "submit_calls": self.submit_calls,
            "video_seconds": round(self.video_seconds, 1),
            "cost_cny": round(self.cost_cny, 4),
        }


@dataclass
class Intake:
    """The checked contents of one upload, stored under `folder` (`images/` and the voice track)."""

    folder: Path
    images: list[Path] = field(default_factory=list)
    audio: Path | None = None
    audio_seconds: float = 0.0
    server_folder: Path | None = None
    preset: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    problems: list[FileProblem] = field(default_factory=list)
    _shas: set[str] = field(default_factory=set)

    def estimate(self, detect_price: float, video_price: float) -> Estimate:
        seconds = self.audio_seconds * len(self.images)
        return Estimate(
            images=len(self.images),
            detect_calls=len(self._shas),
            submit_calls=len(self.images),
            video_seconds=seconds,
            cost_cny=len(self._shas) * detect_price + seconds * video_price,
        )

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _clean_name(raw: str | None) -> str | None:
    """The name to store a file under, or None when the name itself is unacceptable (paths, control characters)."""
    name = unicodedata.normalize("NFC", raw or "").strip()
    if not name or name in (".", "..") or name.startswith(".") or _BAD_NAME.search(name) or len(name.encode()) > 200:
        return None
    return name


async def _store(part: BodyPartReader, dest: Path, cap: int) -> int | None:
    """Stream a part to `dest`; None (and nothing kept) once it passes `cap` bytes, the rest read and dropped."""
    size = 0
    async with await anyio.open_file(dest, "wb") as fh:  # a slow disk stalls a worker thread, not every request
        while chunk := await part.read_chunk(_CHUNK):
            size += len(chunk)
            if size > cap:
                break
            await fh.write(chunk)
    if size <= cap:
        return size
    await anyio.Path(dest).unlink(missing_ok=True)
    while await part.read_chunk(_CHUNK):
        pass
    return None


async def _text(part: BodyPartReader) -> str:
    data = await part.read(decode=False)
    if len(data) > MAX_TEXT_BYTES:
        raise UploadRefused(f"field {part.name!r} is too long (at most {MAX_TEXT_BYTES // 1024} KB)")
    return bytes(data).decode("utf-8", errors="replace").strip()


async def read_intake(request: web.Request, folder: Path) -> Intake:
    """Read a `multipart/form-data` body into `folder`, checking as it goes. The caller discards the folder
    unless it keeps the intake; on `UploadRefused` it is already gone."""
    await anyio.Path(folder / "images").mkdir(parents=True)
    intake = Intake(folder)
    try:
        await _read_parts(request, intake)
        await _check(intake)
    except BaseException:
        intake.discard()
        raise
    return intake


async def _read_parts(request: web.Request, intake: Intake) -> None:
    if not request.content_type.startswith("multipart/"):
        raise UploadRefused("send the files as multipart/form-data (fields: images, audio, preset, params)")
    reader = await request.multipart()
    count = 0
    names: set[str] = set()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise UploadRefused("nested multipart bodies are not accepted")
        if part.name == "images":
            count += 1
            if count > MAX_IMAGES:
                raise UploadRefused(
                    f"too many photos in one upload: at most {MAX_IMAGES}; for more, put them in a folder on the "
                    "server and name that folder instead"
                )
            await _store_file(part, intake, names, kind="image")
        elif part.name == "audio":
            if intake.audio is not None:
                raise UploadRefused("send one voice track (field audio), not several")
            await _store_file(part, intake, names, kind="audio")
        elif part.name == "preset":
            intake.preset = await _text(part) or None
        elif part.name == "folder":
            if text := await _text(part):
                intake.server_folder = Path(await anyio.Path(text).expanduser())
        elif part.name == "params":
            text = await _text(part)
            try:
                params = json.loads(text) if text else {}
            except ValueError:
                raise UploadRefused('params: not valid JSON; send an object such as {"eye_move_freq": 0.5}') from None
            if not isinstance(params, dict):
                raise UploadRefused('params: send a JSON object such as {"eye_move_freq": 0.5}')
            intake.params = params
        else:
            raise UploadRefused(f"unknown field {part.name!r}; use images, audio, folder, preset, params")


async def _store_file(part: BodyPartReader, intake: Intake, names: set[str], *, kind: str) -> None:
    label = part.filename or "(no name)"
    name = _clean_name(part.filename)
    cap = IMAGE_MAX_BYTES if kind == "image" else AUDIO_MAX_BYTES
    if name is None:
        await part.release()
        intake.problems.append(
            FileProblem(
                label,
                "the file name is not accepted (it contains a folder, starts with '.' or has control "
                "characters); rename the file and upload it again",
            )
        )
        return
    unique, n = name, 1
    while unique.lower() in names:
        n += 1
        unique = f"{n}-{name}"
    names.add(unique.lower())
    dest = (intake.folder / "images" / unique) if kind == "image" else (intake.folder / f"voice-{unique}")
    size = await _store(part, dest, cap)
    if size is None:
        what = "photo" if kind == "image" else "voice track"
        intake.problems.append(
            FileProblem(label, f"too large: the service accepts a {what} below {cap // _MIB} MB; make it smaller")
        )
        return
    if kind == "image":
        intake.images.append(dest)
    else:
        intake.audio = dest


async def _check(intake: Intake) -> None:
    """The engine's own local checks, per file; a refused file leaves the intake with its problem recorded."""
    if intake.audio is not None:
        try:
            info = await anyio.to_thread.run_sync(inspect_audio, intake.audio)
            intake.audio_seconds = info.duration_s
        except MediaError as exc:
            intake.problems.append(FileProblem(intake.audio.name.removeprefix("voice-"), exc.reason))
            intake.audio.unlink(missing_ok=True)
            intake.audio = None
    kept: list[Path] = []
    for path in intake.images:
        try:
            image = await anyio.to_thread.run_sync(inspect_image, path)
        except MediaError as exc:
            intake.problems.append(FileProblem(path.name, exc.reason))
            path.unlink(missing_ok=True)
            continue
        # The plan picks images by suffix: store each under the suffix of what it really is.
        final = path.with_suffix(image.suffix) if path.suffix.lower() != image.suffix else path
        if final != path:
            if final.exists():
                final = path.with_name(f"{path.name}{image.suffix}")
            path.rename(final)
        intake._shas.add(image.sha256)
        kept.append(final)
    intake.images = kept


def video_params(intake: Intake, preset_params: dict[str, Any]) -> VideoParams:
    """The preset's parameters with the upload's adjustments, validated against the documented ranges."""
    try:
        return VideoParams.model_validate({**preset_params, **intake.params})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UploadRefused(f"params.{where}: {first['msg']}") from None
