"""An attach that gives way: a short base request arriving while an adapter is being added
layer by layer, with the attach giving way to forward passes between its layers
(`scheduler.GiveWay.between`, the working tree) and without (the same code with `between`
made a no-op), interleaved in one process.

    python bench/give_way.py [--base HuggingFaceTB/SmolLM2-135M-Instruct] [--pairs 12]
                             [--threads N] [--results bench/results/serving.md]

In-process engine on CPU, the base with adapter a0 attached, nothing else running. Each trial
starts attaching a fresh adapter (r=16 on all linear layers) in a thread and sends a base
request answering 2 tokens (greedy) 30, 40, ..., 80 ms later (the attach's layer loop runs from
~20 ms to ~80 ms after it starts on this machine; the offsets cycle so both sides see the same
ones); trials alternate on / off. Measured: the request's latency over idle in decode steps
(median and worst), and how long the attach took. Target: within one decode step of idle.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from concurrency import RESULTS_HEADER  # this script's folder
from stall import QUESTION
from switch_latency import make_runs, publish, start_run

from medchat import scheduler
from medchat.base_model import resolve_base_model
from medchat.engine import Engine, GenerationSettings
from medchat.registry import Registry

ROOT = Path(__file__).resolve().parents[1]


def measure(base: Path, runs: Path, pairs: int) -> dict:
    names = make_runs(base, runs, 2 * pairs + 1)
    engine = Engine(Registry(runs, base_name=str(base), base_path=base), device="cpu")
    engine.load_base()
    engine.prepare(f"adapter:{names[0]}")

    def request(n: int = 2) -> float:
        t = time.perf_counter()
        engine.chat("base", QUESTION, settings=GenerationSettings(
            max_new_tokens=n, temperature=0.0, repetition_penalty=1.0))
        return time.perf_counter() - t

    def during_attach(name: str, offset: float) -> tuple[float, float]:
        took: list[float] = []

        def attach() -> None:
            t = time.perf_counter()
            engine.prepare(f"adapter:{name}")
            took.append(time.perf_counter() - t)

        worker = threading.Thread(target=attach)
        worker.start()
        time.sleep(offset)
        latency = request()
        worker.join()
        return latency, took[0]

    for _ in range(3):  # warm-up
        request()
        request(12)
    idle = [request() for _ in range(2 * pairs)]
    step = statistics.median((request(12) - request(2)) / 10 for _ in range(pairs))
    real = scheduler.GiveWay.between
    trials: dict[str, list[tuple[float, float]]] = {"on": [], "off": []}
    try:
        for i in range(2 * pairs):
            side = "on" if i % 2 == 0 else "off"
            scheduler.GiveWay.between = real if side == "on" else (lambda self: None)
            offset = 0.03 + 0.01 * ((i // 2) % 6)
            trials[side].append(during_attach(names[i + 1], offset))
    finally:
        scheduler.GiveWay.between = real
    return {"idle": statistics.median(idle), "step": step, "trials": trials}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--base", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    ap.add_argument("--pairs", type=int, default=12, help="trials per side")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "serving.md"))
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base = resolve_base_model(args.base).path
    run = start_run(args.threads)
    with tempfile.TemporaryDirectory(prefix="medchat-give-way-") as tmp:
        runs = Path(tmp) / "runs"
        runs.mkdir()
        r = measure(base, runs, args.pairs)
    idle, step = r["idle"], r["step"]

    def steps(seconds: float) -> str:
        return f"{(seconds - idle) / step:+.1f}"

    lines = [
        "## A short request while an adapter is added: giving way between layers, on and off",
        "",
        f"Base `{args.base}` (float32, CPU), in-process engine, adapter a0 attached, nothing "
        "else running. A base request answering 2 tokens (greedy) sent 30-80 ms after another "
        "adapter (r=16, all linear layers) starts attaching; the attach gives way to forward "
        "passes between its layers (on) or not (off), trials alternating. Latency over idle "
        f"in decode steps; {args.pairs} trials per side. Idle {idle * 1e3:.0f} ms, decode "
        f"step {step * 1e3:.1f} ms.",
        "",
        "| give way | request, median | request, worst | trials over one step | each trial "
        "(steps over idle) | attach took, median |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for side in ("on", "off"):
        latencies = [lat for lat, _ in r["trials"][side]]
        took = [t for _, t in r["trials"][side]]
        over = sum((lat - idle) / step > 1.0 for lat in latencies)
        lines.append(
            f"| {side} | {steps(statistics.median(latencies))} | {steps(max(latencies))} | "
            f"{over} of {len(latencies)} | {' '.join(steps(x) for x in latencies)} | "
            f"{statistics.median(took) * 1e3:.0f} ms |")
    publish(lines, run, "give_way.py", argv, Path(args.results), "give_way", RESULTS_HEADER)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
