"""Console benchmarks: client CPU per item of a batch run through `lpengine serve` with SSE listeners attached,
against the same batch run as the CLI runs it; and how fast a 10 000-item batch's page answers.

    .venv/bin/python scripts/bench_console.py cpu --items 1000 --listeners 10 --repeat 3
    .venv/bin/python scripts/bench_console.py page --items 10000

`cpu`: one emulator process (instant tasks, stub videos, always-pass detect) serves both modes, so only the client
side is measured, each in its own process: `cli` is `Engine(config, on_event=ProgressState().on_event).run()`, what
`lpengine run` does; `console` is a console process whose batch is posted (a server folder plus the voice track) by
a separate listener process that then holds `--listeners` event streams open until the batch is done. Each
measures its own process CPU (user + system) from just before the batch starts to its end, so the console's figure
includes the upload request, the queue, every SSE tick and the summaries it sends. Modes alternate, `--repeat`
times; the medians are compared.

`page`: a batch folder whose state store holds `--items` finished items, opened by a console; the wall time of the
first (cold: the store is read) and a second (warm) answer of the API page, the batch page and the gallery.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import anyio

sys.path.insert(0, str(Path(__file__).parent))
from bench import _start, _stop, make_images, write_wav

KEY = "sk-bench-console"
TOKEN = "bench-console-token-0123456789"
SCRIPT = Path(__file__).resolve()


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _base_yaml(path: Path, base_url: str, images: Path, audio: Path) -> Path:
    path.write_text(
        f"""inputs:
  images: {images}
audio: {audio}
api:
  base_url: {base_url}
  speedup: 1000
storage:
  backend: fileserver
output:
  dir: out
""",
        encoding="utf-8",
    )
    return path


# -- children -----------------------------------------------------------------------------------------------------


async def _child_cli(spec: dict[str, Any]) -> dict[str, Any]:
    from lpengine.config import load_config
    from lpengine.engine import Engine
    from lpengine.progress import ProgressState

    cfg = load_config(Path(spec["config"]))
    state = ProgressState()
    cpu0, wall0 = _cpu(), time.perf_counter()
    async with Engine(cfg, api_key=KEY, on_event=state.on_event) as engine:
        report = await engine.run(on_planned=state.set_total)
    return {"cpu_s": _cpu() - cpu0, "wall_s": time.perf_counter() - wall0, "ok": report.counts}


async def _child_console(spec: dict[str, Any]) -> dict[str, Any]:
    from lpengine.web import ConsoleSettings, open_console

    settings = ConsoleSettings(config=Path(spec["config"]), port=0, token=TOKEN, workspace=Path(spec["workspace"]))
    async with open_console(settings) as console:
        root = console.url.split("/?")[0]
        cpu0, wall0 = _cpu(), time.perf_counter()
        listener = await anyio.open_process(
            [sys.executable, str(SCRIPT), "_listen", root, spec["images"], spec["audio"], str(spec["listeners"])]
        )
        manager = console.manager
        with anyio.fail_after(3600):
            while not (ids := manager.ids()) or manager.meta(ids[0])["state"] not in ("done", "failed", "cancelled"):
                await manager.wait_changed(1.0)
        cpu, wall = _cpu() - cpu0, time.perf_counter() - wall0
        assert listener.stdout is not None
        heard = json.loads((await listener.stdout.receive()).decode())
        await listener.wait()
        summary = await manager.summary(ids[0], items=False)
    return {"cpu_s": cpu, "wall_s": wall, "ok": summary["counts"]["by_state"], "events": heard}


async def _listen(root: str, images: str, audio: str, listeners: int) -> None:
    """Post the batch, then hold `listeners` event streams open until it is done; print how much they heard."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(root, headers=headers, timeout=aiohttp.ClientTimeout(total=None)) as http:
        form = aiohttp.FormData()
        form.add_field("folder", images)
        form.add_field("audio", await anyio.Path(audio).read_bytes(), filename="voice.wav", content_type="audio/wav")
        async with http.post("/api/batches", data=form) as rsp:
            assert rsp.status == 201, await rsp.text()
            bid = (await rsp.json())["id"]
        counts: list[int] = []

        async def listen() -> None:
            n = 0
            async with http.get(f"/api/batches/{bid}/events") as rsp:
                async for line in rsp.content:
                    if line.startswith(b"data:"):
                        n += 1
                        if json.loads(line[5:])["summary"]["state"] in ("done", "failed", "cancelled"):
                            break
            counts.append(n)

        async with anyio.create_task_group() as tg:
            for _ in range(listeners):
                tg.start_soon(listen)
    print(json.dumps({"listeners": len(counts), "events_per_listener": statistics.median(counts)}), flush=True)


def _child(kind: str, spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    run = _child_cli if kind == "_cli" else _child_console
    result = anyio.run(run, spec, backend_options={"use_uvloop": True})
    Path(out_path).write_text(json.dumps(result))
    return 0


# -- cpu ----------------------------------------------------------------------------------------------------------


def bench_cpu(items: int, listeners: int, repeat: int, workdir: Path) -> dict[str, Any]:
    images = workdir / "images"
    make_images(images, items, detector="always_pass")
    audio = write_wav(workdir / "voice.wav", 5.0)
    args = [sys.executable, "-m", "lpengine.emulator", "--port", "0", "--instant", "--speedup", "1000"]
    args += ["--detector", "always_pass", "--video", "stub", "--api-key", KEY]
    emulator = _start(args)
    results: dict[str, list[dict[str, Any]]] = {"cli": [], "console": []}
    try:
        base_url = emulator.url if emulator.url.endswith("/api/v1") else emulator.url.rstrip("/") + "/api/v1"
        for round_ in range(repeat):
            for mode in ("cli", "console"):
                run_dir = workdir / f"{mode}-{round_}"
                run_dir.mkdir()
                config = _base_yaml(run_dir / "batch.yaml", base_url, images, audio)
                spec = {
                    "config": str(config),
                    "workspace": str(run_dir / "ws"),
                    "images": str(images),
                    "audio": str(audio),
                    "listeners": listeners,
                }
                (run_dir / "spec.json").write_text(json.dumps(spec))
                out = run_dir / "result.json"
                env = {"DASHSCOPE_API_KEY": KEY, "PATH": "/usr/bin:/bin"}
                subprocess.run(
                    [sys.executable, str(SCRIPT), f"_{mode}", str(run_dir / "spec.json"), str(out)],
                    check=True,
                    env=env,
                )
                result = json.loads(out.read_text())
                result["cpu_ms_per_item"] = 1000 * result["cpu_s"] / items
                results[mode].append(result)
                print(f"{mode:<8} round {round_}: {result['cpu_ms_per_item']:.3f} ms CPU/item, {result}", flush=True)
    finally:
        _stop(emulator)
    cli = statistics.median(r["cpu_ms_per_item"] for r in results["cli"])
    console = statistics.median(r["cpu_ms_per_item"] for r in results["console"])
    return {"items": items, "listeners": listeners, "cli_ms": cli, "console_ms": console, "ratio": console / cli}


# -- page ---------------------------------------------------------------------------------------------------------


async def bench_page(items: int, workdir: Path) -> dict[str, Any]:
    from lpengine.state import SqliteStateStore
    from lpengine.web import ConsoleSettings, open_console

    base = _base_yaml(workdir / "base.yaml", "http://127.0.0.1:9/api/v1", workdir, workdir / "voice.wav")
    bid = "20260101-000000-abcdef"
    folder = workdir / "ws" / bid
    (folder / "output").mkdir(parents=True)
    (folder / "batch.yaml").write_text(base.read_text().replace("dir: out", "dir: output"), encoding="utf-8")
    estimate = {"images": items, "calls": 2 * items, "video_seconds": 5.0 * items, "cost_cny": items * 0.104}
    meta = {"id": bid, "name": f"{items} photos", "created": time.time(), "state": "done", "count": items}
    (folder / "console.json").write_text(json.dumps({**meta, "estimate": estimate, "params": {}}))
    async with SqliteStateStore(folder / "output" / ".lpengine" / "state.db") as store:
        with store.together():
            for i in range(items):
                name = f"portrait-{i:05d}"
                data = {
                    "input": f"{workdir}/images/{name}.jpg",
                    "output_path": str(folder / "output" / f"{name}.mp4"),
                    "state": "succeeded" if i % 50 else "detect_failed",
                    "reason": "" if i % 50 else "No human face detected.",
                    "stage": "download",
                    "task_id": f"task-{i}",
                    "video_duration": 5.0,
                    "detect_paid": True,
                    "submit_attempts": 1,
                    "timings": {"upload": 0.1, "detect": 0.5, "poll": 7.5, "download": 0.2},
                }
                await store.put(f"item-{i}", name, f"{i:064x}", data)
    timings: dict[str, list[float]] = {}
    settings = ConsoleSettings(config=base, port=0, token=TOKEN, workspace=workdir / "ws")
    async with open_console(settings) as console:
        root = console.url.split("/?")[0]
        async with aiohttp.ClientSession(root, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            for label, path in (
                ("api page (cold, store read)", f"/api/batches/{bid}?page=50"),
                ("api page (warm)", f"/api/batches/{bid}?page=51"),
                ("batch page", f"/batches/{bid}?page=20"),
                ("gallery, needs review", f"/batches/{bid}/gallery?filter=needs_review"),
                ("batches list", "/batches"),
            ):
                start = time.perf_counter()
                async with http.get(path) as rsp:
                    body = await rsp.read()
                    assert rsp.status == 200, (path, rsp.status)
                timings[label] = [round(1000 * (time.perf_counter() - start), 1), len(body)]
                print(f"{label:<30} {timings[label][0]:>8.1f} ms  {len(body):>8} bytes", flush=True)
    return {"items": items, "ms": timings}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("_cli", "_console"):
        return _child(argv[0], argv[1], argv[2])
    if argv and argv[0] == "_listen":
        anyio.run(_listen, argv[1], argv[2], argv[3], int(argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["cpu", "page"])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--listeners", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lpengine-bench-console-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.what == "cpu":
            result = bench_cpu(args.items, args.listeners, args.repeat, workdir)
        else:
            result = anyio.run(bench_page, args.items, workdir)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
