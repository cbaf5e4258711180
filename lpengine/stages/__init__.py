"""The stages, in pipeline order. Each is a plain async function of (context, item); the orchestrator
decides how many run at once and how items move between them. The sixth, `lpengine.stages.analyse`, also takes
the `Analyzer` whose worker processes it uses."""

from lpengine.stages.detect import detect
from lpengine.stages.download import download
from lpengine.stages.poll import PollScheduler, poll_once
from lpengine.stages.submit import submit
from lpengine.stages.upload import prepare, upload

__all__ = ["PollScheduler", "detect", "download", "poll_once", "prepare", "submit", "upload"]
