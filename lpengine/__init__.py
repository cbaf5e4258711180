"""lpengine: a concurrent batch engine for DashScope LivePortrait talking-portrait videos.

Public surface: `Engine`, the config models, the result/report types and the exception hierarchy. Everything else
is internal and may change.
"""

from lpengine.config import (
    ApiConfig,
    BatchConfig,
    ConcurrencyConfig,
    DashScopeTempStorageConfig,
    EmbeddedEmulatorConfig,
    FileServerStorageConfig,
    InputsConfig,
    LoggingConfig,
    OutputConfig,
    PricingConfig,
    RateLimitConfig,
    RetryConfig,
    S3StorageConfig,
    StateConfig,
    UrlStorageConfig,
    VideoParams,
    load_config,
)
from lpengine.engine import DryRunReport, Engine
from lpengine.errors import (
    AmbiguousSubmitError,
    ApiError,
    AuthError,
    BatchFailedError,
    BatchLockedError,
    ConfigError,
    InputRejectedError,
    LPEngineError,
    NetworkError,
    QuotaError,
    RateLimitedError,
    ServerError,
    StateStoreError,
    StorageError,
)
from lpengine.models import ItemResult, ItemState, RunReport
from lpengine.stages.context import ProgressEvent

__all__ = [
    "AmbiguousSubmitError",
    "ApiConfig",
    "ApiError",
    "AuthError",
    "BatchConfig",
    "BatchFailedError",
    "BatchLockedError",
    "ConcurrencyConfig",
    "ConfigError",
    "DashScopeTempStorageConfig",
    "DryRunReport",
    "EmbeddedEmulatorConfig",
    "Engine",
    "FileServerStorageConfig",
    "InputRejectedError",
    "InputsConfig",
    "ItemResult",
    "ItemState",
    "LPEngineError",
    "LoggingConfig",
    "NetworkError",
    "OutputConfig",
    "PricingConfig",
    "ProgressEvent",
    "QuotaError",
    "RateLimitConfig",
    "RateLimitedError",
    "RetryConfig",
    "RunReport",
    "S3StorageConfig",
    "ServerError",
    "StateConfig",
    "StateStoreError",
    "StorageError",
    "UrlStorageConfig",
    "VideoParams",
    "load_config",
]
