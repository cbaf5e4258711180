"""The public surface is exactly `lpengine.__all__`: small, typed, and importable without optional extras."""

from __future__ import annotations

import subprocess
import sys

import lpengine
from lpengine import errors


def test_all_matches_exports() -> None:
    """Every name in __all__ exists, and every public non-module attribute is listed."""
    exported = {name for name in dir(lpengine) if not name.startswith("_")}
    modules = {name for name in exported if type(getattr(lpengine, name)).__name__ == "module"}
    assert set(lpengine.__all__) == exported - modules
    assert len(lpengine.__all__) == len(set(lpengine.__all__))


def test_error_hierarchy_has_one_base_and_says_if_retry_helps() -> None:
    """Every exported error derives from LPEngineError and answers `is_retryable`."""
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, lpengine.LPEngineError), name
    assert errors.is_retryable(lpengine.NetworkError("x"))
    assert not errors.is_retryable(lpengine.ConfigError(["x"]))
    assert errors.is_retryable(lpengine.RateLimitedError("Throttling", "m", status=429))
    assert not errors.is_retryable(lpengine.AuthError("InvalidApiKey", "m", status=401))


def test_import_does_not_pull_heavy_optional_packages() -> None:
    """`import lpengine` stays light: OpenCV, PyAV, boto and psycopg only load when a batch needs them."""
    code = (
        "import sys, lpengine; "
        "print(sorted(m for m in ('cv2', 'av', 'aioboto3', 'skimage', 'psycopg') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
