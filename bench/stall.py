"""Stalls: how long a short base-model request takes while the server attaches an adapter or
loads another model, before and after (the code at an older commit vs the working tree).

    python bench/stall.py [--base HuggingFaceTB/SmolLM2-135M-Instruct] [--before f816a31]
                          [--repeats 3] [--long-tokens 200] [--threads N]
                          [--results bench/results/serving.md]

Each code version runs in its own process (`PYTHONPATH` = its tree: the older commit is checked
out with `git worktree add --detach /tmp/medchat-<commit> <commit>` when missing) with the same
run folders, the in-process engine on CPU, the base model with one adapter (a0) attached:

  idle              a base request answering 2 tokens (greedy), nothing else running;
  decode step       one more token at idle: (12-token answer - 2-token answer) / 10;
  beside an answer  the same request while adapter a0 writes a long answer;
  during attach     the same request sent 50 ms after another adapter starts attaching,
                    while a0 writes a long answer (the attach's own time is shown too);
  attach, no answer the same request sent 50 ms after another adapter starts attaching,
                    nothing else running;
  during load       the same request sent 50 ms after a merged model starts loading from
                    disk (its weight files are dropped from the page cache first, so the load
                    reads them as a model not used for a while would be).
Target: during attach and during load within one decode step of idle. Medians of `--repeats`
(a fresh adapter and a fresh merged folder each time: hard links to the same files).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from concurrency import RESULTS_HEADER  # this script's folder
from switch_latency import make_runs, publish, start_run

# In the child process PYTHONPATH puts the tree under test first, so these are its modules.
import medchat
from medchat.base_model import resolve_base_model
from medchat.chat_format import ensure_chat_template
from medchat.engine import Engine, GenerationSettings
from medchat.registry import Registry
from medchat.run_folder import Run

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is metformin used for?"


# -- one code version (the child process) ---------------------------------------------------

def measure(runs: Path, base: Path, repeats: int, long_tokens: int) -> dict:
    registry = Registry(runs, base_name=str(base), base_path=base)
    engine = Engine(registry, device="cpu", max_cached_models=0)  # merged models: cold each time
    engine.load_base()
    engine.prepare("adapter:a0")

    def greedy(n: int) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=n, temperature=0.0, repetition_penalty=1.0)

    def base_request(n: int = 2) -> float:
        t = time.perf_counter()
        engine.chat("base", QUESTION, settings=greedy(n))
        return time.perf_counter() - t

    def during(action, before_join=lambda: None) -> tuple[float, float]:
        """A base request sent 50 ms after `action` starts in a thread: (its latency, how long
        `action` took); `before_join` runs between the request and waiting for `action`."""
        took: list[float] = []

        def timed():
            t = time.perf_counter()
            action()
            took.append(time.perf_counter() - t)

        worker = threading.Thread(target=timed)
        worker.start()
        time.sleep(0.05)
        latency = base_request()
        before_join()
        worker.join()
        return latency, took[0]

    def beside_long(action=None) -> tuple[float, float | None]:
        """A base request while a0 writes a long answer (and `action` runs in a thread)."""
        long = engine.stream_turn("adapter:a0", QUESTION, settings=greedy(long_tokens),
                                  owner="long")
        next(iter(long))

        def end_long():
            engine.cancel("long")
            long.result()

        if action is not None:
            return during(action, end_long)
        latency = base_request()
        end_long()
        return latency, None

    def attach_alone(k: int) -> tuple[float, float]:
        return during(lambda: engine.prepare(f"adapter:a{k}"))

    def during_load(k: int) -> tuple[float, float]:
        for weights in Run(runs / f"m{k}").merged_dir.glob("*.safetensors"):
            evict(weights)
        return during(lambda: engine.prepare(f"merged:m{k}"))

    for _ in range(3):  # warm-up
        base_request()
        base_request(12)
    idle = [base_request() for _ in range(repeats * 2)]
    step = [(base_request(12) - base_request(2)) / 10 for _ in range(repeats)]
    beside = [beside_long()[0] for _ in range(repeats)]
    attach = [beside_long(lambda k=k: engine.prepare(f"adapter:a{k}"))
              for k in range(1, repeats + 1)]
    alone = [attach_alone(k) for k in range(repeats + 1, 2 * repeats + 1)]
    load = [during_load(k) for k in range(1, repeats + 1)]
    med = statistics.median
    return {"code": str(Path(medchat.__file__).resolve().parents[1]),
            "idle": med(idle), "step": med(step), "beside": med(beside),
            "attach": med(a[0] for a in attach), "attach_took": med(a[1] for a in attach),
            "alone": med(a[0] for a in alone), "alone_took": med(a[1] for a in alone),
            "load": med(x[0] for x in load), "load_took": med(x[1] for x in load),
            "raw": {"idle": idle, "step": step, "beside": beside, "attach": attach,
                    "alone": alone, "load": load}}


def evict(path: Path) -> None:
    """Drop a file's pages from the OS page cache (its next read comes from disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# -- the parent: runs, worktree, both versions, the table ------------------------------------

def make_folders(base: Path, runs: Path, repeats: int) -> None:
    """a0..a{2 repeats} adapters; m1..m{repeats} merged models (one merge, hard-linked)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make_runs(base, runs, 2 * repeats + 1)
    first = Run(runs / "a0")
    merged_src = Path(tempfile.mkdtemp(prefix="medchat-stall-merged-"))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    PeftModel.from_pretrained(model, first.adapter_dir).merge_and_unload().save_pretrained(
        merged_src, safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(base)
    ensure_chat_template(tok)
    tok.save_pretrained(merged_src)
    for k in range(1, repeats + 1):
        run = Run(runs / f"m{k}")
        run.merged_dir.mkdir(parents=True)
        for f in merged_src.iterdir():
            os.link(f, run.merged_dir / f.name)
        manifest = first.manifest()
        manifest.name = f"m{k}"
        run.save_manifest(manifest)


def worktree(commit: str) -> Path:
    tree = Path(tempfile.gettempdir()) / f"medchat-{commit}"
    if not (tree / "medchat").is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=ROOT,
                       check=True)
    return tree


def run_version(tree: Path, runs: Path, base: Path, repeats: int, long_tokens: int,
                threads: int | None) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    env = dict(os.environ, PYTHONPATH=str(tree), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads
    subprocess.run([sys.executable, __file__, "--child", "--runs", str(runs), "--base-dir",
                    str(base), "--repeats", str(repeats), "--long-tokens", str(long_tokens),
                    "--out", str(out)], cwd=tree, env=env, check=True)
    result = json.loads(out.read_text())
    out.unlink()
    if Path(result["code"]) != tree.resolve():
        raise SystemExit(f"the child ran the code in {result['code']}, not {tree}")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--base", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    ap.add_argument("--before", default="f816a31", help="the commit to compare with")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--long-tokens", type=int, default=200,
                    help="length of the answer running beside the attach")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own); 1 gives "
                    "steadier numbers on a shared 2-core machine")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "serving.md"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--runs", help=argparse.SUPPRESS)
    ap.add_argument("--base-dir", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        result = measure(Path(args.runs), Path(args.base_dir), args.repeats, args.long_tokens)
        Path(args.out).write_text(json.dumps(result))
        return 0

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base = resolve_base_model(args.base).path
    run = start_run(args.threads)
    versions = [(f"before ({args.before})", worktree(args.before)), ("after (working tree)", ROOT)]
    results = []
    with tempfile.TemporaryDirectory(prefix="medchat-stall-") as tmp:
        runs = Path(tmp) / "runs"
        make_folders(base, runs, args.repeats)
        for label, tree in versions:
            r = run_version(tree, runs, base, args.repeats, args.long_tokens, args.threads)
            results.append((label, r))
            print(f"{label}: idle {r['idle'] * 1e3:.0f} ms, step {r['step'] * 1e3:.0f} ms, "
                  f"beside {r['beside'] * 1e3:.0f} ms, attach {r['attach'] * 1e3:.0f} ms "
                  f"(took {r['attach_took']:.2f} s), load {r['load'] * 1e3:.0f} ms "
                  f"(took {r['load_took']:.2f} s)", file=sys.stderr, flush=True)

    def over(value: float, r: dict) -> str:
        return f"{value * 1e3:.0f} ms ({(value - r['idle']) / r['step']:+.1f} steps)"

    lines = [
        "## A short request while an adapter attaches or another model loads",
        "",
        f"Base `{args.base}` (float32, CPU), in-process engine, adapter a0 attached. A base "
        "request answering 2 tokens (greedy): idle; beside a0 writing a long answer "
        f"({args.long_tokens} tokens max); sent 50 ms after another adapter (r=16, all linear "
        "layers) starts attaching while a0 writes its long answer (and, next column, with "
        "nothing else running); sent 50 ms after a merged "
        "model starts loading from disk (its files dropped from the page cache first). In "
        "brackets: the difference from idle in decode steps. "
        f"Medians of {args.repeats} (idle: {2 * args.repeats}).",
        "",
        "| code | idle | decode step | beside a long answer | during attach | attach took "
        "| during attach, no long answer | during merged load | load took |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in results:
        lines.append(f"| {label} | {r['idle'] * 1e3:.0f} ms | {r['step'] * 1e3:.0f} ms | "
                     f"{over(r['beside'], r)} | {over(r['attach'], r)} | "
                     f"{r['attach_took']:.2f} s | {over(r['alone'], r)} | {over(r['load'], r)} | "
                     f"{r['load_took']:.2f} s |")
    publish(lines, run, "stall.py", argv, Path(args.results), "stall", RESULTS_HEADER)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
