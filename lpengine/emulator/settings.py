"""Knobs of the emulator: service limits (taken from the API contract), time scaling, and fault injection.

All durations, windows and quotas are in *emulated* seconds; `speedup` maps them onto real time. A field that
exists on the real service carries the contract's default, so an emulator started with no arguments behaves like
DashScope (Beijing) as documented in docs/dashscope-liveportrait-api.md.
"""

from __future__ import annotations

import os
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "ERROR_CATALOGUE",
    "Defect",
    "EmulatorSettings",
    "Endpoint",
    "FaultAction",
    "FaultRule",
    "FaultSettings",
]

Endpoint = Literal["detect", "submit", "task", "list", "cancel", "policy", "upload", "download"]
"""Endpoint names used by fault knobs and by `EmulatorStats` counters.

`task` is `GET /tasks/{id}`, `list` is `GET /tasks`, `policy` is `GET /uploads?action=getPolicy`, `upload` is the
OSS form POST, `download` is a result MP4 GET.
"""

Defect = Literal[
    "frozen", "black", "truncated", "wrong_fps", "lip_lag", "lip_unsynced", "face_lost", "no_audio", "corrupt"
]
"""Defective results the `defect` fault rule makes (`lpengine/emulator/talking.py`)."""

FaultAction = Literal[
    "fail_task",
    "expire_result",
    "unknown_task",
    "error",
    "drop",
    "lose_submit_response",
    "truncate_download",
    "corrupt_download",
    "detect_fail",
    "defect",
]

ERROR_CATALOGUE: dict[str, tuple[int, str]] = {
    # code: (HTTP status, documented message) — §6. Used for injected errors and injected task failures.
    "Throttling": (429, "Requests throttling triggered."),
    "Throttling.RateQuota": (429, "Requests rate limit exceeded, please try again later."),
    "Throttling.BurstRate": (
        429,
        "Request rate increased too quickly. To ensure system stability, please adjust your client logic "
        "to scale requests more smoothly over time.",
    ),
    "Throttling.AllocationQuota": (429, "Allocated quota exceeded, please increase your quota limit."),
    "InternalError": (500, "An internal error has occured, try again later or contact service support."),
    "InternalError.Algo": (500, "An internal error has occured during algorithm execution."),
    "InternalError.Upload": (500, "Failed to upload result."),
    "InternalError.Timeout": (
        500,
        "An internal timeout error has occured during execution, please try again later or contact service support.",
    ),
    "SystemError": (500, "An system error has occured, please try again later."),
    "ModelServiceFailed": (500, "Failed to request model service."),
    "RequestTimeOut": (500, "Request timed out, please try again later."),
    "ModelServingError": (
        503,
        "Too many requests. Your requests are being throttled due to system capacity limits. Please try again later.",
    ),
    "ModelUnavailable": (503, "Model is unavailable, try again later."),
    "InvalidURL": (400, "Required URL is missing or invalid, please check the request URL."),
    "InvalidImage.NoHumanFace": (400, "No human face detected."),
    "InvalidParameter.DataInspection": (
        400,
        "Unable to download the media resource during the data inspection process.",
    ),
    "DataInspectionFailed": (400, "Input or output data may contain inappropriate content."),
    "Arrearage": (400, "Access denied, please make sure your account is in good standing."),
    "AccessDenied.Unpurchased": (
        403,
        "Access to model denied. Please make sure you are eligible for using the model.",
    ),
}

Rate = Annotated[float, Field(ge=0.0, le=1.0)]
_CODED_ACTIONS = frozenset({"error", "fail_task"})
_MESSAGE_ACTIONS = frozenset({"error", "fail_task", "detect_fail"})
_ENDPOINT_ACTIONS = frozenset({"error", "drop"})


def _check_codes(codes: list[str]) -> None:
    unknown = sorted(set(codes) - ERROR_CATALOGUE.keys())
    if unknown:
        raise ValueError(f"unknown error code(s) {unknown}; known: {sorted(ERROR_CATALOGUE)}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class FaultRule(_Model):
    """A deterministic fault: applied to every request (or task) whose image URL contains `match`.

    Task-outcome actions (`fail_task`, `expire_result`, `unknown_task`) are decided when the task is submitted, so
    changing the rules later does not rewrite tasks already queued.
    """

    match: str
    """Substring of the image URL (for `task`, `cancel` and `download`: the image URL the task was submitted with;
    for `upload`: the object key; for `policy`: the model name). `""` matches everything."""
    action: FaultAction
    """`fail_task`: the task runs its full time, then ends FAILED with `code`.
    `expire_result`: the result URL is already expired when the task succeeds (403 on download).
    `unknown_task`: the task runs, then reads UNKNOWN instead of finishing (purged early).
    `error`: the request answers the error `code` (HTTP status from the catalogue).
    `drop`: the connection is closed without a response.
    `lose_submit_response`: the task is created and queued, then the connection is closed without the task id.
    `truncate_download`: the MP4 is cut half-way (Content-Length promises the full size).
    `corrupt_download`: the MP4 arrives with the full length but flipped bytes (its `ftyp` box is destroyed).
    `detect_fail`: the face verdict is "no face" (detect answers pass:false; a task fails
    `InvalidImage.NoHumanFace`).
    `defect`: the task succeeds with a defective video of the kind `defect` names (real video mode)."""
    code: str | None = None
    """Error code for `error` (default `InternalError`) and `fail_task` (default `InternalError.Algo`)."""
    message: str | None = None
    """Overrides the catalogue message (`error`, `fail_task`) or the detect rejection message (`detect_fail`)."""
    endpoint: Endpoint | None = None
    """Restricts `error` and `drop` to one endpoint; other actions are bound to their own endpoint."""
    times: Annotated[int, Field(ge=1)] | None = None
    """Apply at most this many times (counted per `set_faults`); None = always."""
    defect: Defect | None = None
    """For `defect`: frozen, black, truncated, wrong_fps, lip_lag, lip_unsynced, face_lost, no_audio or corrupt
    (`lpengine/emulator/talking.py` says what each looks like)."""

    @model_validator(mode="after")
    def _fits_action(self) -> Self:
        if self.code is not None:
            if self.action not in _CODED_ACTIONS:
                raise ValueError(f"`code` has no effect on action {self.action!r}")
            _check_codes([self.code])
        if self.message is not None and self.action not in _MESSAGE_ACTIONS:
            raise ValueError(f"`message` has no effect on action {self.action!r}")
        if (self.defect is None) != (self.action != "defect"):
            raise ValueError("`defect` names the defect of action 'defect', and only of it")
        if self.endpoint is not None and self.action not in _ENDPOINT_ACTIONS:
            raise ValueError(f"`endpoint` has no effect on action {self.action!r}")
        return self


class FaultSettings(_Model):
    """Random and rule-based faults. Random draws come from one RNG seeded per `set_faults` call, so a given
    sequence of requests sees the same faults on every run."""

    error_rate: dict[Endpoint, Rate] = {}
    """Probability, per endpoint, that a request answers an error drawn from `error_codes` instead of its result."""
    error_codes: list[str] = ["Throttling", "InternalError", "ModelUnavailable"]
    """Codes `error_rate` draws from (uniformly); the HTTP status and message come from the catalogue."""
    latency_s: Annotated[float, Field(ge=0.0)] = 0.0
    """Extra *real* seconds every API, upload and download request waits before it is handled."""
    drop_rate: dict[Endpoint, Rate] = {}
    """Probability, per endpoint, that the connection is closed without a response (nothing happened)."""
    lose_submit_response_rate: Rate = 0.0
    """Probability that a submit is accepted and queued, then its connection is closed: the client has no task id."""
    truncate_download_rate: Rate = 0.0
    """Probability that a result download stops half-way."""
    corrupt_download_rate: Rate = 0.0
    """Probability that a result download arrives complete in length but with damaged bytes."""
    task_failure_rate: Rate = 0.0
    """Probability that an otherwise valid task ends FAILED with a code drawn from `task_failure_codes`."""
    task_failure_codes: list[str] = ["InternalError.Algo"]
    """`InternalError.Algo` is worth a resubmit; a permanent code such as `DataInspectionFailed` is not."""
    unknown_task_rate: Rate = 0.0
    """Probability that a task reads UNKNOWN when it would have finished (purged before its 24 h)."""
    seed: int | None = None
    """Seed for these draws; None uses the emulator's `seed`."""
    rules: list[FaultRule] = []
    """Deterministic faults, checked before the random ones; the first matching rule wins."""

    @model_validator(mode="after")
    def _known_codes(self) -> Self:
        _check_codes(self.error_codes)
        _check_codes(self.task_failure_codes)
        if not self.error_codes and any(self.error_rate.values()):
            raise ValueError("error_rate needs at least one code in error_codes")
        if not self.task_failure_codes and self.task_failure_rate:
            raise ValueError("task_failure_rate needs at least one code in task_failure_codes")
        return self


def _default_api_keys() -> list[str]:
    key = os.environ.get("DASHSCOPE_API_KEY")
    return [key] if key else ["sk-emulator"]


Seconds = Annotated[float, Field(gt=0.0)]
Qps = Annotated[float, Field(gt=0.0)]


class EmulatorSettings(_Model):
    """How the emulator listens, how fast emulated time runs, and the service limits it enforces."""

    host: str = "127.0.0.1"
    """Bind address. Loopback only by default: the emulator accepts any configured key and serves uploads."""
    port: Annotated[int, Field(ge=0, le=65535)] = 0
    """0 picks a free port (read it back from `base_url`)."""
    api_keys: Annotated[list[str], Field(min_length=1)] = Field(default_factory=_default_api_keys)
    """Accepted bearer keys; all belong to one account (shared quotas, one shared queue). Defaults to
    `$DASHSCOPE_API_KEY` when set, so a client configured for the real service works unchanged."""
    speedup: Annotated[float, Field(ge=1e-3)] = 1.0
    """Emulated seconds per real second. Every duration, quota window and expiry is divided by it."""
    realtime_factor: Annotated[float, Field(ge=0.0)] = 1.5
    """A task runs for audio duration × this (emulated seconds)."""
    realtime_noise: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    """Relative ± uniform noise on each run time (seeded), e.g. 0.2 = ±20 %."""
    instant: bool = False
    """Tasks take no time at all (they still pass through PENDING → RUNNING → SUCCEEDED in order)."""
    seed: int = 0
    """Seeds run-time noise and, unless `faults.seed` is set, fault draws."""
    detect_qps: Qps = 5.0
    """`liveportrait-detect` quota (§7: 5 QPS)."""
    submit_qps: Qps = 5.0
    """`liveportrait` submit quota (§7: 5 QPS)."""
    query_qps: Qps = 20.0
    """One budget shared by task query, list and cancel (§7: 20 QPS per account)."""
    policy_qps: Qps = 100.0
    """getPolicy quota, per model (§8: 100 QPS per account and model)."""
    burst_protection: bool = False
    """Answer 429 `Throttling.BurstRate` when a family's request count more than doubles from one emulated second
    to the next (beyond half its quota), like the service's ramp guard (§7). Off by default: undocumented shape."""
    result_url_ttl_s: Seconds = 86_400.0
    """Result MP4 URLs expire this long after the task ends (§4: 24 h)."""
    task_retention_s: Seconds = 86_400.0
    """A finished task reads UNKNOWN this long after it was submitted (§4: 24 h)."""
    temp_file_ttl_s: Seconds = 172_800.0
    """`oss://` temporary uploads are deleted this long after upload (§8: 48 h)."""
    policy_ttl_s: Seconds = 300.0
    """An upload policy is valid this long after getPolicy (§8: 300 s)."""
    task_timeout_s: Seconds = 10_800.0
    """A task with no result this long after submission ends FAILED `InternalError.Timeout` (§6: 3 h)."""
    audio_max_s: Seconds = 180.0
    """Audio must be shorter than this (§3: "1s < duration < 3min"; the docs disagree between 180 s and 300 s, 180 s
    is the current figure)."""
    detector: Literal["auto", "haar", "rule", "always_pass"] = "auto"
    """How detect decides pass/fail: `auto` = `haar` when OpenCV is importable, else `rule` (docs/emulator.md)."""
    video: Literal["real", "stub"] = "real"
    """`real`: an MP4 of the still image with the submitted audio (needs PyAV, else falls back to `stub`).
    `stub`: one tiny fixed MP4 for every task (fast, for load tests)."""
    result_shape: Literal["results", "flat", "none"] = "results"
    """Where a SUCCEEDED answer puts the video URL: `results` = `output.results.video_url` (§4, LivePortrait),
    `flat` = `output.video_url` (the sibling video models' shape), `none` = nowhere (a malformed answer)."""
    unreachable_input: Literal["reject", "fail_task"] = "reject"
    """What a submit whose image or audio cannot be downloaded gets: `reject` = §6's synchronous 400
    `InvalidParameter.InputDownloadFailed`, no task; `fail_task` = a task queued that ends FAILED `InvalidURL` when
    it reaches the runner (§3's shape, as a service that fetches later would answer)."""
    status_aliases: dict[str, str] = {}
    """`task_status` values renamed in task queries, e.g. `{"RUNNING": "PROCESSING"}`: a state the docs do not list,
    as the service might add one."""
    faults: FaultSettings = FaultSettings()
    """Fault injection at start; replace at run time with `set_faults` or `PUT /_emulator/faults`."""

    @model_validator(mode="after")
    def _retention_covers_timeout(self) -> Self:
        # Tasks are purged oldest first; a task can only be purged once it is finished.
        if self.task_retention_s < self.task_timeout_s:
            raise ValueError("task_retention_s must be at least task_timeout_s")
        return self
