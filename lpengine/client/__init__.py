"""The DashScope API client: endpoints, wire types, pacing."""

from lpengine.client.api import DashScopeClient, classify_error
from lpengine.client.limits import EndpointBudget, RateMeter
from lpengine.client.wire import DetectResult, SubmitResult, TaskInfo, TaskListPage, TaskStatus, UploadPolicy

__all__ = [
    "DashScopeClient",
    "DetectResult",
    "EndpointBudget",
    "RateMeter",
    "SubmitResult",
    "TaskInfo",
    "TaskListPage",
    "TaskStatus",
    "UploadPolicy",
    "classify_error",
]
