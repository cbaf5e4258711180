"""The account the emulator simulates: virtual clock, quotas, the one-at-a-time task queue, uploads, results,
fault decisions and statistics.

Everything here is synchronous and driven by the virtual clock only: the queue is advanced *lazily* whenever state
is read (`settle`), by replaying what must have happened since the last read. No background task runs, so a given
sequence of requests and clock readings always produces the same states and timestamps.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import random
import secrets
import time
import uuid
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict

from lpengine.emulator.settings import (
    ERROR_CATALOGUE,
    EmulatorSettings,
    Endpoint,
    FaultAction,
    FaultRule,
    FaultSettings,
)
from lpengine.emulator.talking import Look

__all__ = [
    "ApiError",
    "Clock",
    "EmulatorState",
    "EmulatorStats",
    "FinishedRun",
    "ManualClock",
    "OssError",
    "SystemClock",
    "Task",
    "format_time",
]

TaskStatus = Literal["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELED", "UNKNOWN"]
Family = Literal["detect", "submit", "query", "policy"]
MediaKey = tuple[str, str, int, Look]
"""Image sha256, audio sha256, frame rate, and how the head moves: what makes one result video."""
"""(image sha256, audio sha256, fps): what a real-mode result video is made of."""

BEIJING = timezone(timedelta(hours=8))  # the service's region; the API's time strings carry no zone (§1)
UPLOAD_MAX_MB = 100  # §8 example policy
OSS_ACCESS_KEY_ID = "LTAI5tEmulatorAccessKey"
_TERMINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELED"})
_BAD_SIGNATURE = "The request signature we calculated does not match the signature you provided."
_OVERWRITE = "The object you specified already exists and can not be overwritten."


class Clock(Protocol):
    """Where real time comes from; swap in `ManualClock` to make emulated time move only on `advance()`."""

    def monotonic(self) -> float: ...

    def time(self) -> float: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()


class ManualClock:
    """Real time that stands still unless `tick()`ed: tests drive emulated time with `advance()` alone."""

    def __init__(self, start: float = 1_767_225_600.0) -> None:
        self._start = start
        self._elapsed = 0.0

    def monotonic(self) -> float:
        return self._elapsed

    def time(self) -> float:
        return self._start

    def tick(self, real_seconds: float) -> None:
        self._elapsed += real_seconds


class VirtualClock:
    """`virtual_now = start_epoch + speedup × real elapsed + advanced`: all API timestamps and expiries use it."""

    def __init__(self, clock: Clock, speedup: float) -> None:
        self._clock = clock
        self._speedup = speedup
        self._t0 = clock.monotonic()
        self._epoch = clock.time()
        self._advanced = 0.0

    def now(self) -> float:
        return self._epoch + self._speedup * (self._clock.monotonic() - self._t0) + self._advanced

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("the emulated clock only moves forward")
        self._advanced += seconds


def format_time(t: float) -> str:
    """§1: `YYYY-MM-DD HH:mm:ss.SSS`, no zone (Beijing time, like the service's region)."""
    dt = datetime.fromtimestamp(t, BEIJING)
    return dt.strftime("%Y-%m-%d %H:%M:%S.") + f"{dt.microsecond // 1000:03d}"


def parse_list_time(value: str) -> float:
    """§5: `YYYYMMDDhhmmss`, Beijing time."""
    return datetime.strptime(value, "%Y%m%d%H%M%S").replace(tzinfo=BEIJING).timestamp()


class ApiError(Exception):
    """An API answer with the flat error body `{"code","message","request_id"}` (§1)."""

    def __init__(self, status: int, code: str, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s
        """Emulated seconds a throttled caller should wait (sent as `Retry-After` on 429s)."""

    @classmethod
    def catalogued(cls, code: str, message: str | None = None, *, retry_after_s: float = 1.0) -> ApiError:
        status, default = ERROR_CATALOGUE[code]
        return cls(status, code, message or default, retry_after_s=retry_after_s)


class OssError(Exception):
    """An OSS answer (upload host and result URLs): XML `<Error><Code>…</Code><Message>…</Message></Error>`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class _Stats(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class FinishedRun(_Stats):
    """One task that occupied the runner. Times are virtual-clock epoch seconds."""

    task_id: str
    status: TaskStatus
    """SUCCEEDED, FAILED, or UNKNOWN for a task purged early by a fault."""
    image_sha256: str | None
    """None when the image could not be fetched."""
    audio_duration: float
    run_s: float
    """Emulated seconds on the runner (0 for tasks that fail input checks at start)."""
    scheduled: float
    end: float


class EmulatorStats(_Stats):
    """A snapshot of what the emulated account has seen. Durations are emulated seconds; times are virtual-clock
    epoch seconds."""

    now: float
    """The virtual clock when the snapshot was taken."""
    requests: dict[str, int]
    """Requests per endpoint (`detect`, `submit`, `task`, `list`, `cancel`, `policy`, `upload`, `download`),
    whatever their answer; control endpoints are not counted."""
    throttled: dict[str, int]
    """HTTP 429 answers per endpoint: quota, burst guard and injected `Throttling*` errors alike."""
    faults: dict[str, int]
    """Faults applied per kind (the `FaultRule.action` names), rule-driven and random alike."""
    submissions_per_image: dict[str, int]
    """Accepted submits (tasks created) per image sha256; a count above 1 is a paid duplicate. Submits whose image
    could not be fetched have no hash and are not counted here."""
    detect_per_image: dict[str, int]
    """Detect calls that got as far as a verdict, per image sha256."""
    tasks_by_status: dict[str, int]
    """Current status of every task ever created; purged tasks count as UNKNOWN."""
    runner_busy_s: float
    """Time the account's single runner spent on tasks, from the first submission to the last task end."""
    runner_idle_s: float
    """Time the runner had nothing to do over the same span (the sum of `idle_gaps`)."""
    idle_gaps: list[float]
    """Each stretch where the queue was empty between two runs (a client not keeping the queue fed)."""
    runs: list[FinishedRun]
    """Every task that reached the runner, in run order."""
    uploads: int
    """Successful temporary-file uploads (§8)."""
    result_downloads: int
    """Result MP4 responses started (including truncated or corrupted ones)."""


@dataclass(slots=True)
class Task:
    task_id: str
    request_id: str
    """The submit's request id (the list API reports it, §5)."""
    api_key_id: str
    image_url: str
    image_sha256: str | None
    audio_duration: float
    media: MediaKey | None
    """Set in real-video mode: the blobs this task's video is made of."""
    submitted_at: float
    run_s: float
    failure: tuple[str, str] | None
    """Planned outcome (code, message) when the task must fail: input check or injected fault."""
    vanishes: bool
    """Reads UNKNOWN at its end instead of finishing (`unknown_task` fault)."""
    result_expired: bool
    """Its result URL expires as soon as it is issued (`expire_result` fault)."""
    status: TaskStatus = "PENDING"
    scheduled_at: float | None = None
    ends_at: float | None = None
    """Planned end while RUNNING; actual end once terminal."""
    timed_out: bool = False
    code: str | None = None
    message: str | None = None
    result_token: str | None = None


@dataclass(slots=True)
class Result:
    token: str
    task_id: str
    image_url: str
    media: MediaKey | None
    expires_at: float


@dataclass(slots=True)
class Policy:
    model: str
    upload_dir: str
    expires_at: float


@dataclass(slots=True)
class Upload:
    model: str
    data: bytes
    expires_at: float


class _TokenBucket:
    """Capacity = qps, refilled at qps per emulated second: a full second's quota may arrive at once (§7)."""

    def __init__(self, qps: float, now: float) -> None:
        self._capacity = max(qps, 1.0)
        self._rate = qps
        self._tokens = self._capacity
        self._at = now

    def take(self, now: float) -> bool:
        self._tokens = min(self._capacity, self._tokens + max(0.0, now - self._at) * self._rate)
        self._at = max(self._at, now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def refill_s(self) -> float:
        """Emulated seconds until the next token (after a refused `take`)."""
        return (1.0 - self._tokens) / self._rate


class _RampGuard:
    """`Throttling.BurstRate` model: in each whole emulated second a family may take at most
    max(⌈qps/2⌉, 2 × what it took in the previous second). The service documents the error, not its formula."""

    def __init__(self, qps: float) -> None:
        self._floor = max(1, math.ceil(qps / 2))
        self._window: int | None = None
        self._count = 0
        self._previous = 0

    def allows(self, now: float) -> bool:
        window = math.floor(now)
        if window != self._window:
            follows = self._window is not None and window == self._window + 1
            self._previous = self._count if follows else 0
            self._window, self._count = window, 0
        return self._count < max(self._floor, 2 * self._previous)

    def record(self) -> None:
        self._count += 1


@dataclass(slots=True)
class _Counters:
    requests: Counter[str] = field(default_factory=Counter)
    throttled: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    submissions: Counter[str] = field(default_factory=Counter)
    detects: Counter[str] = field(default_factory=Counter)
    runs: list[FinishedRun] = field(default_factory=list)
    idle_gaps: list[float] = field(default_factory=list)
    busy_s: float = 0.0
    purged: int = 0
    uploads: int = 0
    downloads: int = 0


class EmulatorState:
    """One DashScope account: shared quotas, one FIFO queue with a single runner, temp uploads and results."""

    def __init__(self, settings: EmulatorSettings, clock: Clock) -> None:
        self.settings = settings
        self.clock = VirtualClock(clock, settings.speedup)
        self._secret = secrets.token_bytes(32)
        self._key_ids = {key: str(150_000 + i) for i, key in enumerate(settings.api_keys)}
        self._qps: dict[Family, float] = {
            "detect": settings.detect_qps,
            "submit": settings.submit_qps,
            "query": settings.query_qps,
            "policy": settings.policy_qps,
        }
        self.faults = settings.faults
        self.reset()

    # --- lifecycle -------------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget tasks, uploads, results and statistics; fault rule counters and RNGs start over."""
        self._buckets: dict[str, _TokenBucket] = {}
        self._ramps: dict[str, _RampGuard] = {}
        self._tasks: dict[str, Task] = {}
        self._queue: deque[Task] = deque()
        self._running: Task | None = None
        self._free_at: float | None = None
        self._results: OrderedDict[str, Result] = OrderedDict()
        self._policies: OrderedDict[str, Policy] = OrderedDict()
        self._uploads: OrderedDict[str, Upload] = OrderedDict()
        self._blobs: dict[str, bytes] = {}
        self._blob_refs: Counter[str] = Counter()
        self._run_rng = random.Random(self.settings.seed)
        self._stats = _Counters()
        self.set_faults(self.faults)

    def set_faults(self, faults: FaultSettings) -> None:
        self.faults = faults
        self._fault_rng = random.Random(self.settings.seed if faults.seed is None else faults.seed)
        self._rule_uses = [0] * len(faults.rules)

    def now(self) -> float:
        return self.clock.now()

    # --- auth, quotas, faults ---------------------------------------------------------------------------------

    def key_id(self, api_key: str) -> str | None:
        return self._key_ids.get(api_key)

    def count_request(self, endpoint: Endpoint) -> None:
        self._stats.requests[endpoint] += 1

    def count_throttled(self, endpoint: Endpoint) -> None:
        self._stats.throttled[endpoint] += 1

    def admit(self, family: Family, bucket_key: str) -> ApiError | None:
        """Spend one request of the family's quota; the 429 if there is none left (§7), with the time until there
        is (the service documents no `Retry-After`; the emulator sends one so that clients can be tested on it)."""
        now = self.now()
        qps = self._qps[family]
        if self.settings.burst_protection:
            ramp = self._ramps.setdefault(bucket_key, _RampGuard(qps))
            if not ramp.allows(now):
                return ApiError.catalogued("Throttling.BurstRate", retry_after_s=math.floor(now) + 1.0 - now)
        bucket = self._buckets.setdefault(bucket_key, _TokenBucket(qps, now))
        if not bucket.take(now):
            return ApiError.catalogued("Throttling.RateQuota", retry_after_s=bucket.refill_s())
        if self.settings.burst_protection:
            self._ramps[bucket_key].record()
        return None

    def rule(self, action: FaultAction, subject: str, endpoint: Endpoint | None = None) -> FaultRule | None:
        """The first usable rule for `action` matching `subject` (and `endpoint`); using it counts against its
        `times`."""
        for index, rule in enumerate(self.faults.rules):
            if rule.action != action or rule.match not in subject:
                continue
            if rule.endpoint is not None and rule.endpoint != endpoint:
                continue
            if rule.times is not None and self._rule_uses[index] >= rule.times:
                continue
            self._rule_uses[index] += 1
            self._stats.faults[action] += 1
            return rule
        return None

    def chance(self, rate: float, action: FaultAction) -> bool:
        if rate <= 0.0 or self._fault_rng.random() >= rate:
            return False
        self._stats.faults[action] += 1
        return True

    def request_fault(self, endpoint: Endpoint, subject: str) -> ApiError | Literal["drop"] | None:
        """Rule-driven, then random `drop` / `error` for one request."""
        if self.rule("drop", subject, endpoint) is not None:
            return "drop"
        rule = self.rule("error", subject, endpoint)
        if rule is not None:
            return ApiError.catalogued(rule.code or "InternalError", rule.message)
        if self.chance(self.faults.drop_rate.get(endpoint, 0.0), "drop"):
            return "drop"
        if self.chance(self.faults.error_rate.get(endpoint, 0.0), "error"):
            return ApiError.catalogued(self._fault_rng.choice(self.faults.error_codes))
        return None

    def applies(self, action: FaultAction, subject: str, rate: float) -> bool:
        """A rule for `action` matches `subject`, or the random draw at `rate` hits."""
        return self.rule(action, subject) is not None or self.chance(rate, action)

    # --- tasks ------------------------------------------------------------------------------------------------

    def submit(
        self,
        *,
        request_id: str,
        api_key: str,
        image_url: str,
        image_sha256: str | None,
        audio_duration: float,
        media: tuple[MediaKey, bytes, bytes] | None,
        input_failure: tuple[str, str] | None,
    ) -> Task:
        """Queue a task. An `input_failure` (unreachable URL, no face) makes it fail as soon as it reaches the
        runner, without running; otherwise the task-outcome faults are drawn here, once."""
        now = self.settle()
        s = self.settings
        failure, vanishes, expired, run_s = input_failure, False, False, 0.0
        if input_failure is None:
            rule = self.rule("fail_task", image_url)
            if rule is not None:
                code = rule.code or "InternalError.Algo"
                failure = (code, rule.message or ERROR_CATALOGUE[code][1])
            elif self.chance(self.faults.task_failure_rate, "fail_task"):
                code = self._fault_rng.choice(self.faults.task_failure_codes)
                failure = (code, ERROR_CATALOGUE[code][1])
            vanishes = self.applies("unknown_task", image_url, self.faults.unknown_task_rate)
            expired = self.rule("expire_result", image_url) is not None
            if not s.instant:
                noise = self._run_rng.uniform(-s.realtime_noise, s.realtime_noise) if s.realtime_noise else 0.0
                run_s = audio_duration * s.realtime_factor * (1.0 + noise)
        media_key = None
        if media is not None and failure is None:
            media_key, thumbnail, audio = media
            self._acquire(media_key[0], thumbnail)
            self._acquire(media_key[1], audio)
        task = Task(
            task_id=str(uuid.uuid4()),
            request_id=request_id,
            api_key_id=self._key_ids[api_key],
            image_url=image_url,
            image_sha256=image_sha256,
            audio_duration=audio_duration,
            media=media_key,
            submitted_at=now,
            run_s=run_s,
            failure=failure,
            vanishes=vanishes,
            result_expired=expired,
        )
        self._tasks[task.task_id] = task
        self._queue.append(task)
        if image_sha256 is not None:
            self._stats.submissions[image_sha256] += 1
        return task

    def task(self, task_id: str) -> Task | None:
        """The task as it stands now; None when unknown or purged (reads UNKNOWN, §4)."""
        self.settle()
        return self._tasks.get(task_id)

    def peek(self, task_id: str) -> Task | None:
        """The task without advancing the queue (fault matching before the request is handled)."""
        return self._tasks.get(task_id)

    def cancel(self, task_id: str) -> bool:
        """§5: only a PENDING task can be cancelled."""
        now = self.settle()
        task = self._tasks.get(task_id)
        if task is None or task.status != "PENDING":
            return False
        self._queue.remove(task)
        task.status, task.ends_at = "CANCELED", now
        self._release(task.media)
        return True

    def list_tasks(
        self,
        *,
        start: float,
        end: float,
        task_id: str | None,
        model_name: str | None,
        status: str | None,
    ) -> list[Task]:
        """§5: tasks created in [start, end), newest first."""
        self.settle()
        if model_name not in (None, "liveportrait"):
            return []
        return [
            t
            for t in reversed(self._tasks.values())
            if start <= t.submitted_at < end
            and (task_id is None or t.task_id == task_id)
            and (status is None or t.status == status)
        ]

    def settle(self) -> float:
        """Replay the runner up to now: finish the running task, start the next, time out waiting ones, purge."""
        now = self.now()
        timeout = self.settings.task_timeout_s
        while True:
            running = self._running
            if running is not None:
                assert running.ends_at is not None
                if running.ends_at > now:
                    # The runner is busy past `now`: waiting tasks whose 3 h are up can never start in time.
                    while self._queue and self._queue[0].submitted_at + timeout <= now:
                        self._time_out_waiting(self._queue.popleft())
                    break
                self._finish(running)
                continue
            if not self._queue:
                break
            task = self._queue.popleft()
            start = task.submitted_at if self._free_at is None else max(self._free_at, task.submitted_at)
            if task.submitted_at + timeout <= start:
                self._time_out_waiting(task)
                continue
            self._start(task, start)
        self._purge(now)
        return now

    def _start(self, task: Task, start: float) -> None:
        if self._free_at is not None and start > self._free_at:
            self._stats.idle_gaps.append(start - self._free_at)
        deadline = task.submitted_at + self.settings.task_timeout_s
        task.status, task.scheduled_at = "RUNNING", start
        task.ends_at = min(start + task.run_s, deadline)
        task.timed_out = start + task.run_s > deadline
        self._running = task

    def _finish(self, task: Task) -> None:
        assert task.ends_at is not None and task.scheduled_at is not None
        end = task.ends_at
        self._running, self._free_at = None, end
        self._stats.busy_s += end - task.scheduled_at
        if task.timed_out:
            self._fail(task, "InternalError.Timeout", ERROR_CATALOGUE["InternalError.Timeout"][1])
        elif task.vanishes:
            del self._tasks[task.task_id]
            self._stats.purged += 1
            task.status = "UNKNOWN"
            self._release(task.media)
        elif task.failure is not None:
            self._fail(task, *task.failure)
        else:
            task.status = "SUCCEEDED"
            token = uuid.uuid4().hex
            ttl = 0.0 if task.result_expired else self.settings.result_url_ttl_s
            self._results[token] = Result(token, task.task_id, task.image_url, task.media, end + ttl)
            task.result_token = token
        self._stats.runs.append(
            FinishedRun(
                task_id=task.task_id,
                status=task.status,
                image_sha256=task.image_sha256,
                audio_duration=task.audio_duration,
                run_s=end - task.scheduled_at,
                scheduled=task.scheduled_at,
                end=end,
            )
        )

    def _fail(self, task: Task, code: str, message: str) -> None:
        task.status, task.code, task.message = "FAILED", code, message
        self._release(task.media)

    def _time_out_waiting(self, task: Task) -> None:
        task.ends_at = task.submitted_at + self.settings.task_timeout_s
        self._fail(task, "InternalError.Timeout", ERROR_CATALOGUE["InternalError.Timeout"][1])

    def _purge(self, now: float) -> None:
        # Oldest first; a finished head always comes before unfinished ones because retention ≥ timeout.
        retention = self.settings.task_retention_s
        while self._tasks:
            head = next(iter(self._tasks.values()))
            if head.status not in _TERMINAL or head.submitted_at + retention > now:
                break
            del self._tasks[head.task_id]
            self._stats.purged += 1
        while self._results:
            result = next(iter(self._results.values()))
            if result.expires_at > now:
                break
            del self._results[result.token]
            self._release(result.media)
        while self._policies and next(iter(self._policies.values())).expires_at <= now:
            self._policies.popitem(last=False)
        while self._uploads and next(iter(self._uploads.values())).expires_at <= now:
            self._uploads.popitem(last=False)

    # --- results ----------------------------------------------------------------------------------------------

    def result_url(self, origin: str, task: Task) -> str:
        """A V1 OSS-style signed URL (`Expires` = virtual epoch seconds, §4, §10)."""
        assert task.result_token is not None and task.ends_at is not None
        expires = int(task.ends_at + (0.0 if task.result_expired else self.settings.result_url_ttl_s))
        signature = self._sign(f"{task.result_token}\n{expires}")
        return (
            f"{origin}/_results/{task.result_token}.mp4"
            f"?Expires={expires}&OSSAccessKeyId={OSS_ACCESS_KEY_ID}&Signature={signature}"
        )

    def open_result(self, token: str, expires: str, signature: str) -> Result:
        """Check a result URL like OSS does: signature, then expiry, then existence."""
        if not hmac.compare_digest(self._sign(f"{token}\n{expires}"), signature):
            raise OssError(403, "SignatureDoesNotMatch", _BAD_SIGNATURE)
        if float(expires) <= self.settle():
            raise OssError(403, "AccessDenied", "Request has expired.")
        result = self._results.get(token)
        if result is None:
            raise OssError(404, "NoSuchKey", "The specified key does not exist.")
        self._stats.downloads += 1
        return result

    def peek_result(self, token: str) -> Result | None:
        return self._results.get(token)

    def blob(self, key: str) -> bytes:
        return self._blobs[key]

    def _acquire(self, key: str, data: bytes) -> None:
        self._blobs.setdefault(key, data)
        self._blob_refs[key] += 1

    def _release(self, media: MediaKey | None) -> None:
        if media is None:
            return
        for key in media[:2]:
            self._blob_refs[key] -= 1
            if self._blob_refs[key] <= 0:
                del self._blob_refs[key]
                self._blobs.pop(key, None)

    def _sign(self, text: str) -> str:
        return hmac.new(self._secret, text.encode(), hashlib.sha256).hexdigest()

    # --- temporary uploads (§8) -------------------------------------------------------------------------------

    def issue_policy(self, model: str, origin: str) -> dict[str, object]:
        """The `data` of a getPolicy answer; the policy document is OSS's (base64 JSON, HMAC-SHA1 signed)."""
        now = self.settle()
        expires = now + self.settings.policy_ttl_s
        day = datetime.fromtimestamp(now, BEIJING).strftime("%Y-%m-%d")
        upload_dir = f"dashscope-instant/{self._account_hash()}/{day}/{uuid.uuid4()}"
        document = {
            "expiration": datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
            "conditions": [
                {"bucket": "dashscope-instant"},
                ["content-length-range", 0, UPLOAD_MAX_MB * 1024 * 1024],
                ["starts-with", "$key", upload_dir],
                {"x-oss-object-acl": "private"},
                {"x-oss-forbid-overwrite": "true"},
            ],
        }
        policy = base64.b64encode(json.dumps(document).encode()).decode()
        self._policies[policy] = Policy(model, upload_dir, expires)
        return {
            "policy": policy,
            "signature": self._policy_signature(policy),
            "upload_dir": upload_dir,
            "upload_host": f"{origin}/_oss",
            "expire_in_seconds": int(self.settings.policy_ttl_s),
            "max_file_size_mb": UPLOAD_MAX_MB,
            "capacity_limit_mb": 999_999_999,
            "oss_access_key_id": OSS_ACCESS_KEY_ID,
            "x_oss_object_acl": "private",
            "x_oss_forbid_overwrite": "true",
        }

    def check_upload(self, *, access_key_id: str, signature: str, policy: str, key: str) -> Policy:
        """OSS PostObject checks that need no file bytes (§8)."""
        if access_key_id != OSS_ACCESS_KEY_ID:
            raise OssError(
                403, "InvalidAccessKeyId", "The OSS Access Key Id you provided does not exist in our records."
            )
        if not hmac.compare_digest(self._policy_signature(policy), signature):
            raise OssError(403, "SignatureDoesNotMatch", _BAD_SIGNATURE)
        now = self.settle()
        issued = self._policies.get(policy)
        if issued is None or issued.expires_at <= now:
            raise OssError(403, "AccessDenied", "Invalid according to Policy: Policy expired.")
        if not key.startswith(issued.upload_dir + "/") or key == issued.upload_dir + "/":
            condition = f'["starts-with", "$key", "{issued.upload_dir}"]'
            raise OssError(403, "AccessDenied", f"Invalid according to Policy: Policy Condition failed: {condition}")
        if key in self._uploads:
            raise OssError(409, "FileAlreadyExists", _OVERWRITE)
        return issued

    def store_upload(self, policy: Policy, key: str, data: bytes) -> None:
        now = self.settle()
        if key in self._uploads:  # a concurrent upload of the same key finished first
            raise OssError(409, "FileAlreadyExists", _OVERWRITE)
        self._uploads[key] = Upload(policy.model, data, now + self.settings.temp_file_ttl_s)
        self._stats.uploads += 1

    def resolve_upload(self, key: str, model: str) -> bytes:
        """An `oss://` input for `model`: exists, not expired, and uploaded for that same model (§8)."""
        self.settle()
        upload = self._uploads.get(key)
        if upload is None or upload.model != model:
            raise ApiError.catalogued("InvalidParameter.DataInspection")
        return upload.data

    def _policy_signature(self, policy: str) -> str:
        return base64.b64encode(hmac.new(self._secret, policy.encode(), hashlib.sha1).digest()).decode()

    def _account_hash(self) -> str:
        return hashlib.sha256(self._secret).hexdigest()[:32]

    # --- statistics -------------------------------------------------------------------------------------------

    def count_detect(self, image_sha256: str) -> None:
        self._stats.detects[image_sha256] += 1

    def stats(self) -> EmulatorStats:
        now = self.settle()
        st = self._stats
        by_status = Counter(t.status for t in self._tasks.values())
        if st.purged:
            by_status["UNKNOWN"] += st.purged
        return EmulatorStats(
            now=now,
            requests=dict(st.requests),
            throttled=dict(st.throttled),
            faults=dict(st.faults),
            submissions_per_image=dict(st.submissions),
            detect_per_image=dict(st.detects),
            tasks_by_status=dict(by_status),
            runner_busy_s=st.busy_s,
            runner_idle_s=sum(st.idle_gaps),
            idle_gaps=list(st.idle_gaps),
            runs=list(st.runs),
            uploads=st.uploads,
            result_downloads=st.downloads,
        )
