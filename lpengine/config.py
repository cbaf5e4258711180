"""Batch configuration: YAML on disk → validated pydantic models, before anything is sent.

Every model forbids unknown keys, because a typo (`eye_move_frq`) silently ignored would cost money: the batch would
run with the default instead of what the user meant. Ranges come from the API contract (§3) so an out-of-range
value is refused locally instead of by a paid request.
"""

from __future__ import annotations

import difflib
import io
import logging
import os
import re
from collections.abc import Iterable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, get_origin

import yaml
from dotenv import dotenv_values
from dotenv.parser import parse_stream
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from lpengine.errors import ConfigError

__all__ = [
    "AnalysisConfig",
    "AnalysisThresholds",
    "ApiConfig",
    "BatchConfig",
    "ConcurrencyConfig",
    "DashScopeTempStorageConfig",
    "EmbeddedEmulatorConfig",
    "FileServerStorageConfig",
    "InputsConfig",
    "LimitsConfig",
    "LoggingConfig",
    "OutputConfig",
    "PresetSpec",
    "PricingConfig",
    "RateLimitConfig",
    "RetryConfig",
    "S3StorageConfig",
    "StateConfig",
    "UrlStorageConfig",
    "VideoParams",
    "load_config",
    "load_secrets",
]

DEFAULT_BASE_URL = "https://dashscope.aliyuncs.com/api/v1"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class VideoParams(_Model):
    """The `parameters` of a `liveportrait` submit (§3), with the documented ranges and defaults."""

    template_id: Literal["normal", "calm", "active"] = "normal"
    """Head-motion template: normal = medium motion, calm = small (news reading), active = large (singing)."""
    eye_move_freq: Annotated[float, Field(ge=0, le=1)] = 0.5
    """Blink frequency, 0–1."""
    video_fps: Annotated[int, Field(ge=15, le=30, strict=True)] = 24
    """Output frame rate, an integer 15–30."""
    mouth_move_strength: Annotated[float, Field(ge=0, le=1.5)] = 1.0
    """Mouth motion amplitude, 0–1.5 (0 = the mouth does not move)."""
    paste_back: Annotated[bool, Field(strict=True)] = True
    """True keeps the whole picture; false outputs only the generated face region."""
    head_move_strength: Annotated[float, Field(ge=0, le=1)] = 0.7
    """Head motion amplitude, 0–1."""


class VideoOverrides(_Model):
    """Per-item overrides from a manifest row: any subset of `VideoParams`, same ranges."""

    template_id: Literal["normal", "calm", "active"] | None = None
    """As `video.template_id`: normal = medium head motion, calm = small (news reading), active = large (singing)."""
    eye_move_freq: Annotated[float, Field(ge=0, le=1)] | None = None
    """As `video.eye_move_freq`."""
    video_fps: Annotated[int, Field(ge=15, le=30)] | None = None
    """As `video.video_fps`."""
    mouth_move_strength: Annotated[float, Field(ge=0, le=1.5)] | None = None
    """As `video.mouth_move_strength`."""
    paste_back: bool | None = None
    """As `video.paste_back`."""
    head_move_strength: Annotated[float, Field(ge=0, le=1)] | None = None
    """As `video.head_move_strength`."""

    def apply(self, base: VideoParams) -> VideoParams:
        return base.model_copy(update=self.model_dump(exclude_none=True))


class PresetSpec(VideoOverrides):
    """A named look: any subset of the video parameters, a purpose, and optionally another preset it builds on
    (docs/presets.md). Ranges are those of `video:`; the values a preset leaves out come from what it extends, then
    from the defaults."""

    description: str = ""
    """What the look is for, shown by `lpengine presets list`."""
    extends: str | None = None
    """Another preset whose values this one starts from (its own values win)."""


class PresetContext(_Model):
    """What `load_config` resolved from the presets, kept for the plan (a manifest row may name a preset) and for
    each item's recorded recipe. Not written in YAML."""

    values: dict[str, dict[str, Any]] = {}
    """Every known preset by name: the values its `extends` chain sets (defaults not included)."""
    batch_preset: str | None = None
    """The preset named in `video: {preset: …}`."""
    batch_overrides: dict[str, Any] = {}
    """The keys written beside it in `video:`, which win over the preset's."""


class InputsConfig(_Model):
    """Where the images come from: a folder/glob, or a manifest with one row per item."""

    images: str | None = None
    """A folder (every image file directly inside it) or a glob such as `photos/**/*.jpg`, relative to the config."""
    manifest: Path | None = None
    """A CSV or JSONL file: column `image` (path or http(s) URL), optional `audio`, `output`, any video parameter."""

    @model_validator(mode="after")
    def _one_source(self) -> InputsConfig:
        if (self.images is None) == (self.manifest is None):
            raise ValueError("give exactly one of `images` (folder or glob) or `manifest` (CSV/JSONL)")
        return self


class RateLimitConfig(_Model):
    """Client-side pacing per endpoint family (§7), so a well-configured run never earns a 429."""

    detect_qps: Annotated[float, Field(gt=0, le=1000)] = 5.0
    """`liveportrait-detect` requests per second (account-wide quota: 5 QPS, 300 RPM)."""
    submit_qps: Annotated[float, Field(gt=0, le=1000)] = 5.0
    """`liveportrait` task submissions per second (quota: 5 QPS)."""
    query_qps: Annotated[float, Field(gt=0, le=1000)] = 20.0
    """Task get/list/cancel requests per second, shared (quota: 20 QPS per account)."""
    upload_policy_qps: Annotated[float, Field(gt=0, le=1000)] = 50.0
    """Temporary-storage getPolicy calls per second (quota: 100 QPS per model)."""
    max_concurrent_requests: Annotated[int, Field(ge=1, le=256)] = 16
    """Upper bound on API requests in flight at once, all families together."""


class RetryConfig(_Model):
    """Retries for retryable errors and network faults: exponential backoff with jitter, bounded twice."""

    attempts: Annotated[int, Field(ge=1, le=20)] = 6
    """Total attempts per request, the first included."""
    initial_wait_s: Annotated[float, Field(ge=0, le=60)] = 0.5
    """First backoff; doubles each retry."""
    max_wait_s: Annotated[float, Field(ge=0, le=300)] = 20.0
    """Cap on one backoff."""
    total_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 120.0
    """Give up on a request after this long, retries included."""


class EmbeddedEmulatorConfig(_Model):
    """Run against the bundled DashScope emulator, started in-process: no API key, no cost."""

    realtime_factor: Annotated[float, Field(gt=0, le=100)] = 1.5
    """Emulated task run time = audio duration × this."""
    detector: Literal["auto", "haar", "rule", "always_pass"] = "auto"
    """How the emulator's detect decides (see docs/emulator.md)."""
    video: Literal["real", "stub"] = "real"
    """`real` encodes a playable MP4 of the image with the audio; `stub` serves a tiny fixed MP4."""


class ApiConfig(_Model):
    """How to reach DashScope. The API key is never here: it comes from `DASHSCOPE_API_KEY` (env or .env)."""

    base_url: str = DEFAULT_BASE_URL
    """The region's API root. LivePortrait exists only in China (Beijing) (§1)."""
    connect_timeout_s: Annotated[float, Field(gt=0, le=120)] = 10.0
    """TCP+TLS connect timeout per request."""
    request_timeout_s: Annotated[float, Field(gt=0, le=600)] = 60.0
    """Whole-request timeout (detect fetches the image server-side, so allow some seconds)."""
    download_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 600.0
    """Timeout for downloading one result MP4."""
    rate_limits: RateLimitConfig = RateLimitConfig()
    retry: RetryConfig = RetryConfig()
    verify_tls: bool = True
    """Keep on. Turning it off is logged loudly on every run."""
    workspace: str | None = None
    """Optional `X-DashScope-WorkSpace` id for sub-workspace keys."""
    emulator: EmbeddedEmulatorConfig | None = None
    """When set, an emulator is started in-process and `base_url` is ignored (the demo uses this)."""
    speedup: Annotated[float, Field(gt=0, le=100_000)] = 1.0
    """Emulators only: their durations, quotas and expiries are divided by this, and the client's pacing and
    polling follow. Must stay 1 against the real service."""

    @model_validator(mode="after")
    def _speedup_only_for_emulators(self) -> ApiConfig:
        loopback = self.base_url.startswith(("http://127.", "http://localhost", "http://[::1]"))
        if self.speedup != 1 and self.emulator is None and not loopback:
            raise ValueError("speedup is for emulators only (embedded, or on a loopback base_url); remove it")
        return self


class FileServerStorageConfig(_Model):
    """Serve the batch's files from a loopback HTTP server (the emulator, or a host the service can reach)."""

    backend: Literal["fileserver"] = "fileserver"
    host: str = "127.0.0.1"
    """Bind address. Only loopback unless you expose the machine on purpose."""
    port: Annotated[int, Field(ge=0, le=65535)] = 0
    """0 picks a free port."""
    public_base_url: str | None = None
    """The URL prefix the service should use (e.g. behind a reverse proxy); default http://host:port."""


class S3StorageConfig(_Model):
    """S3-compatible object storage; Aliyun OSS is the target (§10). Credentials come from the environment."""

    backend: Literal["s3"] = "s3"
    bucket: str
    """Bucket name (must exist)."""
    endpoint_url: str | None = None
    """e.g. https://s3.oss-cn-beijing.aliyuncs.com (OSS); None = AWS."""
    region: str | None = None
    """e.g. oss-cn-beijing."""
    prefix: str = "lpengine/"
    """Key prefix for the objects the batch creates."""
    addressing_style: Literal["virtual", "path", "auto"] = "virtual"
    """OSS refuses path-style (SecondLevelDomainForbidden); keep `virtual` for OSS."""
    signature_version: Literal["s3v4", "s3"] = "s3v4"
    """`s3` (SigV2) is Alibaba's documented fallback for boto3."""
    url_margin_s: Annotated[float, Field(ge=0, le=86400)] = 3600.0
    """Presigned URLs live as long as the batch needs plus this margin, never more."""
    cleanup: Literal["on_success", "always", "never"] = "on_success"
    """Delete the objects this batch created at the end: only if every item succeeded, always, or never."""


class DashScopeTempStorageConfig(_Model):
    """DashScope's free temporary storage (`oss://` URLs, 48 h, no bucket needed) (§8)."""

    backend: Literal["dashscope_temp"] = "dashscope_temp"


class UrlStorageConfig(_Model):
    """Every input is already a public URL (manifest rows with http(s) images and audio); nothing is uploaded."""

    backend: Literal["url"] = "url"


StorageConfig = Annotated[
    FileServerStorageConfig | S3StorageConfig | DashScopeTempStorageConfig | UrlStorageConfig,
    Field(discriminator="backend"),
]


class ConcurrencyConfig(_Model):
    """Workers per stage and the submission window. Throughput is bounded by the service (one task runs at a time)."""

    upload: Annotated[int, Field(ge=1, le=256)] = 8
    """Items checked and published at once (local checks of files over 256 KB run in worker threads)."""
    detect: Annotated[int, Field(ge=1, le=64)] = 4
    """Detect requests in flight at once (all share the detect QPS budget)."""
    submit: Annotated[int, Field(ge=1, le=16)] = 2
    """Submit workers; the submission window, not this, bounds the tasks at the service."""
    poll: Annotated[int, Field(ge=1, le=64)] = 4
    """Concurrent task queries (all share the query QPS budget)."""
    download: Annotated[int, Field(ge=1, le=64)] = 4
    """MP4 downloads at once."""
    submit_window: Annotated[int, Field(ge=1, le=1000)] = 4
    """Tasks outstanding at the service at once. The account runs one at a time and a task id expires 24 h after
    creation, so a few queued tasks keep the runner busy without parking the whole batch at the service."""
    buffer: Annotated[int, Field(ge=0, le=10_000)] = 8
    """Items buffered between two stages (backpressure beyond that)."""


class OutputConfig(_Model):
    """Where results go."""

    dir: Path = Path("output")
    """Where videos, reports and the per-batch JSONL log go (relative to the config file)."""
    overwrite: bool = False
    """Replace an existing MP4 that this batch did not produce (verified outputs of this batch are always kept)."""
    recipe_tags: bool = True
    """Write each video's preset and parameters into its MP4 `comment` tag (no re-encoding, no media byte changed;
    `lpengine presets save NAME --from-video FILE` reads it back)."""


class StateConfig(_Model):
    """The crash-safe record that lets a re-run resume without paying twice."""

    path: Path | None = None
    """SQLite state store; default `<output.dir>/.lpengine/state.db`."""
    url: Annotated[str, Field(pattern=r"^postgres(ql)?://")] | None = None
    """PostgreSQL instead of SQLite (`postgresql://user@host:5432/db`), for several workers on one batch
    (docs/scaling.md). `LPENGINE_STATE_URL` overrides it; keep the password in that variable, `PGPASSWORD` or
    `~/.pgpass`, not in this file. Create or upgrade the tables with `lpengine db upgrade CONFIG`."""
    batch: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    """The batch's name in a shared database; default: the output folder's absolute path. Workers on several
    hosts must give the same name."""
    lease_s: Annotated[float, Field(ge=1, le=3600)] = 120.0
    """PostgreSQL: seconds after a worker's last heartbeat (on the database's clock) before other workers take
    over its items. At least twice `api.request_timeout_s`, so that a dead worker's last submit has been answered
    or has failed for good when its successor reconciles it."""
    max_submit_attempts: Annotated[int, Field(ge=1, le=10)] = 3
    """How many times one item may be submitted in total (retryable task failures, expired tasks)."""


class LoggingConfig(_Model):
    """stderr logging defaults for the CLI (`--log-level` / `--log-format` override them)."""

    level: Literal["debug", "info", "warning", "error"] | None = None
    """stderr level; default: warning (progress bars show the rest on a TTY; cron stays quiet)."""
    format: Literal["console", "json"] = "console"
    """stderr format; the per-batch JSONL file in the output folder is always JSON."""


class PricingConfig(_Model):
    """Cost estimates in CNY (§7); change them if your contract differs."""

    detect_per_image: Annotated[float, Field(ge=0)] = 0.004
    """`liveportrait-detect`, per image (a `pass: false` answer is billed too)."""
    video_per_second: Annotated[float, Field(ge=0)] = 0.02
    """`liveportrait`, per second of generated video."""


class LimitsConfig(_Model):
    """Bounds on waiting for the service."""

    task_timeout_s: Annotated[float, Field(gt=0, le=7 * 86400)] = 4 * 3600.0
    """Give up on a task not finished this long after submission (the service itself fails it after 3 h, §7)."""
    expected_realtime_factor: Annotated[float, Field(gt=0, le=100)] = 1.5
    """Initial guess of task run time ÷ audio duration; learnt from finished tasks as the batch goes."""


class AnalysisThresholds(_Model):
    """When a measured video earns a flag (docs/analysis.md gives the reason for each default)."""

    duration_tolerance_s: Annotated[float, Field(gt=0, le=60)] = 0.5
    """`duration_mismatch` when the video and the input voice track differ by more than this."""
    fps_tolerance: Annotated[float, Field(gt=0, le=30)] = 0.5
    """`fps_mismatch` when the video's frame rate is further than this from the requested `video_fps`."""
    frozen_min_s: Annotated[float, Field(gt=0, le=600)] = 2.0
    """`frozen` when the picture stands still for at least this long (or over `frozen_max_fraction` of it)."""
    frozen_max_fraction: Annotated[float, Field(gt=0, le=1)] = 0.8
    """`frozen` when still runs cover at least this share of the video, however short each run."""
    freeze_noise: Annotated[float, Field(gt=0, le=1)] = 0.0001
    """freezedetect's noise floor: mean absolute frame difference (0–1) below which two frames are the same."""
    black_min_s: Annotated[float, Field(gt=0, le=600)] = 0.5
    """`black_frames` when black frames run for at least this long."""
    face_min_fraction: Annotated[float, Field(ge=0, le=1)] = 0.7
    """`no_face` when a face is found in fewer than this share of the sampled frames."""
    lip_sync_max_offset_ms: Annotated[float, Field(gt=0, le=5000)] = 160.0
    """`lip_sync_offset` when mouth motion best matches the voice at a lag beyond this, either way."""
    lip_sync_min_correlation: Annotated[float, Field(ge=0, le=1)] = 0.5
    """`lip_sync_weak` when mouth motion correlates with the voice's loudness less than this at its best lag."""


class AnalysisConfig(_Model):
    """Judging every downloaded video (frozen, black, no face, lips out of step...) before anyone watches it."""

    enabled: bool = True
    """Analyse each video after its download; off, items end as before with no verdict."""
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    """Worker processes that decode videos (CPU work, kept off the event loop)."""
    timeout_s: Annotated[float, Field(gt=0, le=3600)] = 300.0
    """One video's analysis longer than this ends as `analysis_failed` (the video is kept)."""
    audio_missing: Literal["ignore", "warn", "bad"] = "warn"
    """Severity of `audio_missing`: the contract does not say whether results carry the voice track."""
    thresholds: AnalysisThresholds = AnalysisThresholds()
    """When a video earns each flag."""
    sync_model: str | None = None
    """Optional `module:function` of a learned lip-sync scorer you supply (docs/analysis.md); its figures are
    recorded beside the model-free ones."""


def is_url(ref: str) -> bool:
    """Whether the service fetches this input itself (a URL the user has), rather than lpengine publishing a file."""
    return ref.startswith(("http://", "https://", "oss://"))


class BatchConfig(_Model):
    """One batch: inputs, the voice track, video parameters, and how to reach the API and storage."""

    inputs: InputsConfig
    audio: str | None = None
    """Default audio for every item (wav/mp3, 1–180 s, < 15 MB): a path relative to the config, or an http(s) URL."""
    video: VideoParams = VideoParams()
    """Also takes `preset: NAME`: that preset's values, under the keys written beside it (docs/presets.md)."""
    presets: dict[str, PresetSpec] = {}
    """Presets of this batch, by name; they override presets of the same name from every other source."""
    presets_dir: Path | None = None
    """A folder of preset files (`NAME.yaml`), relative to the config; default: `presets/` beside it, if present."""
    api: ApiConfig = ApiConfig()
    storage: StorageConfig = DashScopeTempStorageConfig()
    """Where the service fetches inputs from; DashScope's temporary storage needs no setup."""
    concurrency: ConcurrencyConfig = ConcurrencyConfig()
    output: OutputConfig = OutputConfig()
    state: StateConfig = StateConfig()
    logging: LoggingConfig = LoggingConfig()
    pricing: PricingConfig = PricingConfig()
    limits: LimitsConfig = LimitsConfig()
    analysis: AnalysisConfig = AnalysisConfig()
    """Judging each downloaded video: verdict, flags and score in the reports (docs/analysis.md)."""
    base_dir: Path = Path(".")
    """Folder that relative paths are resolved against (set by `load_config` to the config file's folder)."""
    preset_context: PresetContext = PresetContext()
    """Set by `load_config` from the presets (`PresetContext`)."""

    def resolve(self, p: Path | str) -> Path:
        path = Path(p).expanduser()
        # normpath, not resolve(): tidy `..` for messages without following the user's symlinks
        return path if path.is_absolute() else Path(os.path.normpath(self.base_dir / path))

    def resolve_ref(self, ref: str) -> str:
        """An input reference as the pipeline keeps it: a URL untouched (a path's normpath would turn `https://h`
        into `https:/h`), anything else a path resolved against the config's folder."""
        return ref if is_url(ref) else str(self.resolve(ref))

    @property
    def output_dir(self) -> Path:
        return self.resolve(self.output.dir)

    @property
    def state_path(self) -> Path:
        return self.resolve(self.state.path) if self.state.path else self.output_dir / ".lpengine" / "state.db"

    @property
    def speedup(self) -> float:
        """Time compression shared by the emulator and the client's pacing (1 for the real service)."""
        return self.api.speedup

    def scaled(self, seconds: float) -> timedelta:
        return timedelta(seconds=seconds / self.speedup)


class Secrets(BaseModel):
    """Credentials, read from the environment or `.env`; never from the YAML, never printed."""

    model_config = ConfigDict(frozen=True)

    api_key: SecretStr | None = None
    oss_access_key_id: SecretStr | None = None
    oss_access_key_secret: SecretStr | None = None
    state_url: SecretStr | None = None
    """`LPENGINE_STATE_URL`: a PostgreSQL URL that may carry a password."""


# ---------------------------------------------------------------------------------------------------------------
# Loading

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _environment(config_dir: Path) -> dict[str, str]:
    """The process environment over `.env` values (cwd, then the config's folder); os.environ is never mutated."""
    env: dict[str, str] = {}
    for folder in (config_dir, Path.cwd()):
        dotenv = folder / ".env"
        if dotenv.is_file():
            for key, value in _read_dotenv(dotenv).items():
                if value is not None:
                    env.setdefault(key, value)
    env.update(os.environ)
    return env


_reported_dotenv_lines: set[tuple[str, int]] = set()


def _read_dotenv(path: Path) -> dict[str, str | None]:
    """A `.env` file's values. A line it cannot read is reported once per process, naming the file and line:
    python-dotenv's own warning names neither the file nor the fix, and came once per read (three per run)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    for binding in parse_stream(io.StringIO(text)):
        where = (os.path.realpath(path), binding.original.line)  # the config's folder is often the cwd too
        if binding.error and where not in _reported_dotenv_lines:
            _reported_dotenv_lines.add(where)
            logging.getLogger("lpengine").warning(
                "%s:%d: not a NAME=value line, ignored (quote a value holding spaces or #)", *where
            )
    dotenv_logger = logging.getLogger("dotenv.main")
    disabled, dotenv_logger.disabled = dotenv_logger.disabled, True  # its warnings were just said better
    try:
        return dotenv_values(stream=io.StringIO(text))
    finally:
        dotenv_logger.disabled = disabled


def load_secrets(config_dir: Path | None = None) -> Secrets:
    env = _environment(config_dir or Path.cwd())

    def pick(*names: str) -> SecretStr | None:
        for name in names:
            if env.get(name):
                return SecretStr(env[name])
        return None

    return Secrets(
        api_key=pick("DASHSCOPE_API_KEY"),
        oss_access_key_id=pick("OSS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"),
        oss_access_key_secret=pick("OSS_ACCESS_KEY_SECRET", "AWS_SECRET_ACCESS_KEY"),
        state_url=pick("LPENGINE_STATE_URL"),
    )


def _interpolate(node: Any, env: dict[str, str], path: str, problems: list[str], file: str) -> Any:
    if isinstance(node, dict):
        return {k: _interpolate(v, env, f"{path}.{k}" if path else str(k), problems, file) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, env, f"{path}[{i}]", problems, file) for i, v in enumerate(node)]
    if isinstance(node, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            problems.append(
                f"{file}: {path}: environment variable ${{{name}}} is not set; "
                f"export it, put it in .env, or write ${{{name}:-default}}"
            )
            return ""

        return _VAR.sub(sub, node)
    return node


def _model_at(loc: tuple[int | str, ...], root: type[BaseModel] = BatchConfig) -> type[BaseModel] | None:
    """The model class that owns the field at `loc`, to list allowed keys for an unknown one."""
    model: type[BaseModel] | None = root
    keyed = False  # the next part of `loc` is a key of a mapping of models (`presets.<name>`)
    for part in loc[:-1]:
        if keyed:
            keyed = False
            continue
        if model is None:
            return None
        field = model.model_fields.get(str(part))
        if field is None:
            # discriminated union tags appear in loc as the tag value
            candidates: dict[str, type[BaseModel]] = {
                "fileserver": FileServerStorageConfig,
                "s3": S3StorageConfig,
                "dashscope_temp": DashScopeTempStorageConfig,
                "url": UrlStorageConfig,
            }
            model = candidates.get(str(part))
            continue
        ann = field.annotation
        keyed = get_origin(ann) is dict
        model = None
        for candidate in getattr(ann, "__args__", (ann,)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                model = candidate
    return model


_INTERNAL_FIELDS = {"base_dir", "preset_context"}


def unknown_key(key: str, allowed: Iterable[str]) -> str:
    """The message for a key no model knows: the closest allowed one, then all of them."""
    names = sorted(allowed)
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"did you mean `{close[0]}`? " if close else ""
    return f"unknown key; {hint}allowed keys: {', '.join(names)}"


def format_validation_error(
    err: ValidationError,
    file: str,
    *,
    root: type[BaseModel] = BatchConfig,
    prefix: tuple[str, ...] = (),
    lines: Mapping[tuple[str, ...], int] | None = None,
) -> list[str]:
    """One line per problem: file (and line, when `lines` maps key paths to them), dotted field path, what is
    wrong, what is allowed. `root` is the model validated, `prefix` the path of its data inside the file."""
    out = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = (*prefix, *(str(p) for p in loc if p not in ("fileserver", "s3", "dashscope_temp", "url")))
        dotted = ".".join(path) or "(top level)"
        where = file
        for n in range(len(path), 0, -1):
            if lines and path[:n] in lines:
                where = f"{file}: line {lines[path[:n]]}"
                break
        if e["type"] == "extra_forbidden":
            owner = _model_at(loc, root)
            allowed = (k for k in (owner.model_fields if owner else {}) if k not in _INTERNAL_FIELDS)
            out.append(f"{where}: {dotted}: {unknown_key(str(loc[-1]), allowed)}")
        elif e["type"] == "missing":
            out.append(f"{where}: {dotted}: required field is missing")
        elif e["type"] == "union_tag_invalid":
            out.append(f"{where}: {dotted}: unknown storage backend; allowed: fileserver, s3, dashscope_temp, url")
        else:
            msg = e["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
            got = e.get("input")
            shown = f" (got {got!r})" if isinstance(got, str | int | float | bool) else ""
            out.append(f"{where}: {dotted}: {msg}{shown}")
    return out


def load_config(path: Path | str, *, overrides: dict[str, Any] | None = None) -> BatchConfig:
    """Read, interpolate and validate a batch YAML; raise `ConfigError` listing every problem at once."""
    path = Path(path)
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{file}: file not found; check the path"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{file}: not UTF-8 text; save the file as UTF-8"]) from None
    except OSError as exc:
        raise ConfigError([f"{file}: cannot read the file ({exc.strerror}); check permissions"]) from None
    try:
        raw = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError([f"{file}: nested too deeply to be a batch config; check the YAML"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError([f"{file}: {where}{problem}; fix the YAML syntax"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{file}: the top level must be a mapping of keys (inputs:, audio:, video:, …)"])
    base_dir = path.resolve().parent
    problems: list[str] = []
    if _too_big(raw):
        raise ConfigError([f"{file}: expands to more than {_MAX_NODES:,} values (YAML aliases?); simplify the file"])
    data = _interpolate(raw, _environment(base_dir), "", problems, file)
    for internal in sorted(_INTERNAL_FIELDS & set(data)):
        problems.append(f"{file}: {internal}: unknown key; it is set by lpengine, not written in the file")
        data.pop(internal)
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    from lpengine.presets import apply_presets  # the presets module builds on this one

    apply_presets(data, file=file, text=text, base_dir=base_dir, problems=problems)
    try:
        config = BatchConfig.model_validate({**data, "base_dir": base_dir})
    except ValidationError as exc:
        problems.extend(format_validation_error(exc, file))
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    return config


_MAX_NODES = 100_000


def _too_big(root: Any) -> bool:
    """YAML aliases share nodes; expanding them (as interpolation does) can explode ("billion laughs")."""
    count, stack = 0, [root]
    while stack:
        node = stack.pop()
        count += 1
        if count > _MAX_NODES:
            return True
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """A command-line override such as `output.dir`. A non-mapping in the way (`output: 3`) is left for validation
    to report, rather than silently replaced."""
    node = data
    *parents, last = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            return
        node = child
    node[last] = value
