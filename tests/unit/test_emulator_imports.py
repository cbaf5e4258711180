"""The emulator's worker threads import OpenCV on first use: many of them at once must all succeed.

OpenCV's package loader puts its native extension in `sys.modules["cv2"]` for a moment while it loads; a thread
that imports `cv2.data` in that moment is told "'cv2' is not a package" (a traceback the demo showed under load).
The moment is far too short to hit on purpose, so the script below stretches it: a profile hook stops the first
importer inside it until the other threads have made their own first-time imports (or half a second has passed,
which is what happens when they correctly wait for the first import to finish).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("cv2") is None, reason="needs the emulator extra")

THREADS = 8

SCRIPT = f"""
import io, sys, threading
from PIL import Image
from lpengine.emulator.media import FaceDetector, inspect_image

assert "cv2" not in sys.modules, "not a first-time import"
buffer = io.BytesIO()
Image.new("RGB", (64, 64), (120, 90, 60)).save(buffer, format="PNG")
image = inspect_image(buffer.getvalue())
detector = FaceDetector("haar")
window_open, others_done = threading.Event(), threading.Event()
finished, errors, lock = [], [], threading.Lock()

def hook(frame, event, arg):
    # the loader's inner import of the native extension returns: `sys.modules["cv2"]` is not the package now
    native = event == "return" and frame.f_code.co_name == "import_module" and getattr(arg, "__name__", "") == "cv2"
    if native and not hasattr(arg, "__path__") and not window_open.is_set():
        window_open.set()
        others_done.wait(timeout=0.5)

def detect(first):
    if not first:
        window_open.wait(timeout=30)
    try:
        detector._haar(image.pixels)
    except Exception as exc:
        errors.append(repr(exc))
    with lock:
        finished.append(first)
        if len(finished) == {THREADS} - 1 and not first:
            others_done.set()

threading.setprofile(hook)
threads = [threading.Thread(target=detect, args=(n == 0,)) for n in range({THREADS})]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join(timeout=60)
print(window_open.is_set(), len(finished), errors)
"""


def test_many_first_time_opencv_imports_at_once_all_succeed() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    # the window was really open while the others imported, every thread finished, none failed
    assert proc.stdout.strip().split(maxsplit=2) == ["True", str(THREADS), "[]"], proc.stdout
