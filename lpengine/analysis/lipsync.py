"""A model-free lip-sync measure: does the mouth region move with the voice's loudness, and at what lag?

This is **not** LSE-C/LSE-D. Those SyncNet scores, used in talking-head papers, come from a learned audio-visual
embedding whose weights nothing here can download. What is measured instead, per video frame:

- the voice's loudness envelope: RMS of the samples under each frame;
- the mouth's opening: the mouth crops' first principal component (the one way the region changes most, which in
  a talking head is the mouth opening and closing);

both with their slow drift removed (a one-second moving average), then their normalised cross-correlation over
lags of up to ±`MAX_LAG_MS`. The best lag is where the correlation is largest in magnitude (a principal
component's sign is arbitrary); a positive lag means the mouth moves after the voice.

A learned scorer of your own can run beside it: `analysis.sync_model: "package.module:function"` in the config
names a function `(mouths, voice, fps) -> dict[str, float]`, given the mouth crops (frames × 16 × 32 float32 luma),
the voice (mono float32 at 16 kHz) and the frame rate. Its figures are stored under the `sync_model` metric; the
flags stay with the model-free measure, whose thresholds are documented.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import numpy as np

MAX_LAG_MS = 800.0
_MIN_SPREAD = 1e-6  # below this a signal is flat: no correlation can be measured


def loudness_envelope(voice: np.ndarray, rate: int, fps: float, frames: int) -> np.ndarray:
    """RMS of the samples under each of `frames` video frames (zero past the end of the voice)."""
    bounds = (np.arange(frames + 1) * (rate / fps)).astype(np.int64)
    bounds = np.minimum(bounds, len(voice))
    energy = np.concatenate([[0.0], np.cumsum(voice.astype(np.float64) ** 2)])
    counts = np.maximum(bounds[1:] - bounds[:-1], 1)
    return np.asarray(np.sqrt((energy[bounds[1:]] - energy[bounds[:-1]]) / counts))


def mouth_signal(mouths: np.ndarray) -> np.ndarray:
    """Each frame's position along the mouth crops' first principal component."""
    flat = mouths.reshape(len(mouths), -1).astype(np.float64)
    flat -= flat.mean(axis=0)
    if len(flat) < flat.shape[1]:  # the smaller of the two Gram matrices: a short video needs no 512×512 one
        values, vectors = np.linalg.eigh(flat @ flat.T)
        return np.asarray(vectors[:, -1] * np.sqrt(max(values[-1], 0.0)))
    _, vectors = np.linalg.eigh(flat.T @ flat)
    return np.asarray(flat @ vectors[:, -1])


def best_lag(envelope: np.ndarray, mouth: np.ndarray, fps: float) -> tuple[float | None, float | None]:
    """(|correlation|, lag in ms) at the best lag, or (None, None) when the voice is silent or too short."""
    n = min(len(envelope), len(mouth))
    window = max(1, round(fps))
    if n < 2 * window:
        return None, None
    voice, lips = _detrend(envelope[:n], window), _detrend(mouth[:n], window)
    if voice.std() < _MIN_SPREAD * max(1.0, float(np.abs(envelope).max())):
        return None, None
    max_lag = min(round(MAX_LAG_MS / 1000 * fps), n // 2)
    best, best_k = 0.0, 0
    for k in range(-max_lag, max_lag + 1):
        a, b = (voice[: n - k], lips[k:]) if k >= 0 else (voice[-k:], lips[: n + k])
        r = _pearson(a, b)
        if abs(r) > abs(best):
            best, best_k = r, k
    return round(abs(best), 4), round(best_k * 1000 / fps, 1)


def _detrend(signal: np.ndarray, window: int) -> np.ndarray:
    kernel = np.ones(window) / window
    padded = np.pad(signal, (window // 2, window - 1 - window // 2), mode="edge")
    return np.asarray(signal - np.convolve(padded, kernel, mode="valid"))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    spread = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / spread) if spread > _MIN_SPREAD else 0.0


def run_model(spec: str, mouths: np.ndarray, voice: np.ndarray, fps: float) -> dict[str, float]:
    """Call the user's scorer named `module:function` (see the module docstring)."""
    module, _, name = spec.partition(":")
    scorer: Callable[[np.ndarray, np.ndarray, float], Any] = getattr(importlib.import_module(module), name)
    return {str(k): float(v) for k, v in dict(scorer(mouths, voice, fps)).items()}
