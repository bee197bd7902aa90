"""Concurrency: aggregate tokens/s and time to first token with 1, 4, 8 and 16 clients at once,
each on the serving targets, plus plain `generate` on a left-padded batch of the same size.

    python bench/concurrency.py [--base HuggingFaceTB/SmolLM2-135M-Instruct]
                                [--targets app] [--clients 1,4,8,16]
                                [--requests-per-client 4] [--max-new-tokens 64] [--threads N]
                                [--results bench/results/serving.md]

Workload: N clients start together; each sends `--requests-per-client` chat requests one after
another (a closed loop), request k of client i going to model (i + k) mod 4 of base, adapter 1,
adapter 2, merged (so every level mixes all four), with question (i + k) mod 4 of four fixed
questions and the model's own system prompt, greedy (temperature 0, repetition penalty 1),
`--max-new-tokens` tokens at most, streamed. Measured per level: aggregate tokens/s (answer
tokens of every request / wall time from the start to the last answer), and time to first
token (request sent -> first streamed text) median and p95 over all requests, and p95 again
over "steady" requests (each client's first request left out: the first wave arrives all at
once, later requests arrive while others are being answered). Greedy answers must be the same
at every level: each (model, question) answer is compared with the first time it was asked.
Each level runs right after a 1-client run of the same target and its ratios compare with that
run: the machine is shared and its load drifts over minutes.

Targets (an OpenAI-compatible /v1 endpoint each; add one to TARGETS):
  app        the in-process backend through the app: `python launch.py --runs R --base B`
             in its own process, driven over HTTP through its /v1 API (httpx, server-sent
             events; answer tokens from the usage counts).
  generate   the reference row, always measured: `model.generate` on the base, one
             left-padded batch of N rows (the same questions), `--max-new-tokens` tokens each
             (min_new_tokens too, so every row counts the same), TTFT = a 1-token generate of
             the same batch.
  mixed      the second reference row, always measured: the same mix as the clients ask
             (base, adapters, merged) with plain transformers + peft at their fastest: the
             base and adapter rows in one batch through peft's mixed-batch `generate`
             (`adapter_names`), the merged rows in another, the two on two threads at once; 1
             row = the four models one after another. Its ratio is what batching with the
             plain libraries gives this workload on this machine.
A further target (vLLM behind the app, vLLM directly) is an `OpenAITarget` with the server's
URL, a map from registry ids to the names it serves, and how to start and stop it.

Models: runs/smollm2-medqa (its adapter and merged model) with one synthetic adapter when that
run is complete, else two synthetic adapters (r=16 on all linear layers, random A and B, so
their answers differ) and the first one merged with peft, all on the real base model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from switch_latency import (make_runs, publish, start_run,  # this script's folder
                            wait_for_app)

from medchat.base_model import DEFAULT_BASE_MODEL, resolve_base_model
from medchat.chat_format import ensure_chat_template, prompt_ids
from medchat.registry import Registry
from medchat.run_folder import Run

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["How should I take metformin, and what side effects should I watch for?",
             "Can I drink alcohol while taking ibuprofen?",
             "What is lisinopril used for and what are its common side effects?",
             "Is it safe to take acetaminophen during pregnancy?"]
TRAINED_RUN = "smollm2-medqa"
RESULTS_HEADER = "# Serving benchmarks\n"


# -- models ----------------------------------------------------------------------------------------

def prepare_runs(base: Path, runs: Path) -> list[str]:
    """The four registry ids clients cycle through: base, two adapters, one merged model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trained = Run(ROOT / "runs" / TRAINED_RUN)
    if trained.has_adapter() and trained.has_merged():
        os.symlink(trained.path, runs / TRAINED_RUN)
        names = make_runs(base, runs, 1)
        return ["base", f"adapter:{TRAINED_RUN}", f"adapter:{names[0]}",
                f"merged:{TRAINED_RUN}"]
    names = make_runs(base, runs, 2)
    first = Run(runs / names[0])
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, first.adapter_dir).merge_and_unload()
    merged.save_pretrained(first.merged_dir, safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(base)
    ensure_chat_template(tok)
    tok.save_pretrained(first.merged_dir)
    return ["base", f"adapter:{names[0]}", f"adapter:{names[1]}", f"merged:{names[0]}"]


# -- targets ---------------------------------------------------------------------------------------

@dataclass
class Answer:
    ttft: float  # seconds from sending to the first streamed text
    text: str
    tokens: int  # answer tokens (the server's usage count)
    client: int
    index: int  # the client's k-th request


@dataclass
class OpenAITarget:
    """An OpenAI-compatible server: `url` ends in /v1; `names` maps registry ids to the model
    names it serves (default: the ids themselves)."""

    name: str
    url: str
    names: dict[str, str] = field(default_factory=dict)
    api_key: str | None = None
    start: Callable[[], None] = lambda: None
    stop: Callable[[], None] = lambda: None

    def ask(self, http, model: str, messages: list[dict], max_tokens: int) -> tuple:
        body = {"model": self.names.get(model, model), "messages": messages,
                "max_tokens": max_tokens, "temperature": 0, "repetition_penalty": 1.0,
                "stream": True, "stream_options": {"include_usage": True}}
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        t0 = time.perf_counter()
        ttft, text, tokens = None, "", 0
        with http.stream("POST", f"{self.url}/chat/completions", json=body, headers=headers,
                         timeout=900) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{self.name}: HTTP {r.status_code}: {r.read()[:300]!r}")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                for choice in event.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        if ttft is None:
                            ttft = time.perf_counter() - t0
                        text += piece
                if event.get("usage"):
                    tokens = int(event["usage"]["completion_tokens"])
        return (time.perf_counter() - t0 if ttft is None else ttft), text, tokens


def app_target(base: Path, runs: Path, max_clients: int, port: int,
               threads: int | None = None) -> OpenAITarget:
    """The app (`python launch.py`) in its own process, in-process backend, served on /v1."""
    proc: list[subprocess.Popen] = []

    def start() -> None:
        env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
                   TOKENIZERS_PARALLELISM="false")
        env.pop("SPACE_ID", None)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in the app process
        p = subprocess.Popen(
            [sys.executable, str(ROOT / "launch.py"), "--runs", str(runs), "--base", str(base),
             "--port", str(port), "--device", "cpu", "--concurrency", str(max_clients),
             "--queue-size", str(max_clients)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        proc.append(p)
        wait_for_app(p, port, 600)

    def stop() -> None:
        for p in proc:
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()

    return OpenAITarget("app (in-process backend)", f"http://127.0.0.1:{port}/v1",
                        start=start, stop=stop)


# name -> factory(base folder, runs folder, most clients, port, torch threads); add more here
TARGETS: dict[str, Callable[..., OpenAITarget]] = {"app": app_target}


# -- measuring -------------------------------------------------------------------------------------

def messages_for(registry: Registry, model: str, question: str) -> list[dict]:
    return [{"role": "system", "content": registry.get(model).system_prompt},
            {"role": "user", "content": question}]


def run_level(target: OpenAITarget, registry: Registry, models: list[str], clients: int,
              per_client: int, max_tokens: int) -> tuple[float, list[tuple]]:
    """`clients` closed-loop clients at once; returns (wall seconds, per-request rows)."""
    import httpx

    rows: list[tuple] = []
    errors: list[BaseException] = []
    start = threading.Barrier(clients + 1)
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client() as http:
            start.wait()
            for k in range(per_client):
                model, question = models[(i + k) % len(models)], QUESTIONS[(i + k) % 4]
                try:
                    ttft, text, tokens = target.ask(http, model, messages_for(
                        registry, model, question), max_tokens)
                except BaseException as e:  # reported after the level
                    errors.append(e)
                    return
                with lock:
                    rows.append((model, question, Answer(ttft, text, tokens, i, k)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return wall, rows


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


def summarize(wall: float, rows: list[tuple]) -> dict:
    answers = [a for _, _, a in rows]
    steady = [a.ttft for a in answers if a.index > 0] or [a.ttft for a in answers]
    tokens = sum(a.tokens for a in answers)
    return {"requests": len(answers), "tokens": tokens, "wall": wall, "tps": tokens / wall,
            "ttft_median": statistics.median(a.ttft for a in answers),
            "ttft_p95": p95([a.ttft for a in answers]), "ttft_p95_steady": p95(steady)}


class Generate:
    """Plain `generate` on one left-padded batch of N rows (the base model)."""

    name = "plain generate, left-padded batch (base only)"

    def __init__(self, base: Path, registry: Registry, max_tokens: int):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(base)
        ensure_chat_template(self.tok)
        self.model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        self.registry, self.max_tokens = registry, max_tokens

    def level(self, n: int) -> dict:
        import torch

        tok = self.tok
        prompts = [prompt_ids(tok, messages_for(self.registry, "base", QUESTIONS[i % 4]))
                   for i in range(n)]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

        def gen(new: int) -> float:
            t = time.perf_counter()
            with torch.inference_mode():
                self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                    min_new_tokens=new, do_sample=False,
                                    pad_token_id=tok.pad_token_id)
            return time.perf_counter() - t

        gen(2)  # warm-up: this batch shape's first allocations
        ttft = gen(1)
        wall = gen(self.max_tokens)
        return {"clients": n, "requests": n, "tokens": n * self.max_tokens, "wall": wall,
                "tps": n * self.max_tokens / wall, "ttft_median": ttft, "ttft_p95": ttft,
                "ttft_p95_steady": ttft, "mismatches": 0}


class MixedGenerate:
    """The same mix with plain transformers + peft, as fast as they go: row i of a level to
    model i mod 4 and question i mod 4 (what each client's first request asks); the base and
    adapter rows in one left-padded batch through peft's mixed-batch `generate`
    (`adapter_names`), the merged model's rows in another batch, the two batches on two
    threads at once (as the app's two model loops run); 1 row: the four models one after
    another (as one client asks them). No streaming, no HTTP, no scheduler: the ceiling of
    the workload on this machine for an engine built on these libraries."""

    name = "plain generate, the same mix (peft adapter batch + merged batch on two threads)"

    def __init__(self, base: Path, registry: Registry, models: list[str], max_tokens: int):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(base)
        ensure_chat_template(self.tok)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        self.routes: list[tuple[str, str | None]] = []  # per model: (group, adapter name)
        peft = None
        for i, model_id in enumerate(models):
            entry = registry.get(model_id)
            if entry.kind == "adapter":
                name = f"a{i}"
                if peft is None:
                    peft = PeftModel.from_pretrained(model, str(entry.path), adapter_name=name)
                else:
                    peft.load_adapter(str(entry.path), adapter_name=name)
                self.routes.append(("lora", name))
            elif entry.kind == "merged":
                self.merged = AutoModelForCausalLM.from_pretrained(
                    entry.path, dtype=torch.float32).eval()
                self.routes.append(("merged", None))
            else:
                self.routes.append(("lora", "__base__"))  # peft's name for "no adapter"
        self.peft = peft.eval()
        self.registry, self.models, self.max_tokens = registry, models, max_tokens

    def _batch(self, rows: list[int]):
        import torch

        tok = self.tok
        prompts = [prompt_ids(tok, messages_for(self.registry, self.models[i % 4],
                                                QUESTIONS[i % 4])) for i in rows]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        return ids, mask

    def _gen(self, group: str, rows: list[int], new: int) -> None:
        import torch

        ids, mask = self._batch(rows)
        kwargs = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": new,
                  "min_new_tokens": new, "do_sample": False,
                  "pad_token_id": self.tok.pad_token_id}
        with torch.inference_mode():
            if group == "merged":
                self.merged.generate(**kwargs)
            else:
                self.peft.generate(**kwargs,
                                   adapter_names=[self.routes[i % 4][1] for i in rows])

    def _together(self, n: int, new: int) -> float:
        groups: dict[str, list[int]] = {}
        for i in range(n):
            groups.setdefault(self.routes[i % 4][0], []).append(i)
        workers = [threading.Thread(target=self._gen, args=(g, rows, new))
                   for g, rows in groups.items()]
        t = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return time.perf_counter() - t

    def level(self, n: int) -> dict:
        if n == 1:  # one client: the four models one after another
            ttfts, wall = [], 0.0
            for i in range(4):
                self._gen(self.routes[i][0], [i], 2)  # warm-up
                t = time.perf_counter()
                self._gen(self.routes[i][0], [i], 1)
                ttfts.append(time.perf_counter() - t)
                t = time.perf_counter()
                self._gen(self.routes[i][0], [i], self.max_tokens)
                wall += time.perf_counter() - t
            return {"clients": 1, "requests": 4, "tokens": 4 * self.max_tokens, "wall": wall,
                    "tps": 4 * self.max_tokens / wall, "ttft_median": statistics.median(ttfts),
                    "ttft_p95": max(ttfts), "ttft_p95_steady": max(ttfts), "mismatches": 0}
        self._together(n, 2)  # warm-up
        ttft = self._together(n, 1)
        wall = self._together(n, self.max_tokens)
        return {"clients": n, "requests": n, "tokens": n * self.max_tokens, "wall": wall,
                "tps": n * self.max_tokens / wall, "ttft_median": ttft, "ttft_p95": ttft,
                "ttft_p95_steady": ttft, "mismatches": 0}


def measure(targets: list[OpenAITarget], references: list, registry: Registry,
            models: list[str], levels: list[int], per_client: int,
            max_tokens: int) -> dict[str, list[dict]]:
    """Every level of every target, each next to a fresh 1-client run of the same target (this
    machine is shared: the load drifts, so each ratio compares runs minutes apart at most).
    Returns target name -> rows (the 1-client row: the median of its 1-client runs)."""
    import httpx

    out: dict[str, list[dict]] = {}
    for target in targets:
        first: dict[tuple[str, str], str] = {}
        singles, rows = [], []
        target.start()
        try:
            with httpx.Client() as http:  # warm-up: attach adapters, load the merged model
                for model in models:
                    target.ask(http, model, messages_for(registry, model, QUESTIONS[0]), 4)
            for n in levels:
                pair = [1, n] if n != 1 else [1]
                for m in pair:
                    wall, answers = run_level(target, registry, models, m, per_client,
                                              max_tokens)
                    stats = summarize(wall, answers)
                    stats.update(clients=m, mismatches=sum(
                        a.text != first.setdefault((model, q), a.text)
                        for model, q, a in answers))
                    (singles if m == 1 else rows).append(stats)
                    if m != 1:
                        stats["baseline"] = singles[-1]
                    print(f"{target.name} {m:>2} clients: {stats['tps']:.1f} tok/s, TTFT "
                          f"median {stats['ttft_median'] * 1e3:.0f} ms p95 "
                          f"{stats['ttft_p95'] * 1e3:.0f} ms (steady "
                          f"{stats['ttft_p95_steady'] * 1e3:.0f} ms), {stats['tokens']} tokens "
                          f"in {wall:.1f} s, answers differing from the first run: "
                          f"{stats['mismatches']}", file=sys.stderr, flush=True)
        finally:
            target.stop()
        out[target.name] = [_median_row(singles)] + rows
    for reference in references:
        singles, rows = [], []
        for n in levels:
            for m in ([1, n] if n != 1 else [1]):
                stats = reference.level(m)
                (singles if m == 1 else rows).append(stats)
                if m != 1:
                    stats["baseline"] = singles[-1]
                print(f"{reference.name} {m:>2} rows: {stats['tps']:.1f} tok/s, TTFT "
                      f"{stats['ttft_p95'] * 1e3:.0f} ms", file=sys.stderr, flush=True)
        out[reference.name] = [_median_row(singles)] + rows
    return out


def _median_row(singles: list[dict]) -> dict:
    row = dict(singles[0])
    for key in ("tps", "ttft_median", "ttft_p95", "ttft_p95_steady"):
        row[key] = statistics.median(r[key] for r in singles)
    row["runs"] = len(singles)
    row["mismatches"] = sum(r["mismatches"] for r in singles)
    return row


# -- report ----------------------------------------------------------------------------------------

def table(name: str, rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        one = r.get("baseline", r)
        lines.append(
            f"| {name} | {r['clients']} | {r['requests']} | {r['tokens']} | {r['tps']:.1f} | "
            f"{r['tps'] / one['tps']:.2f}x | {r['ttft_median'] * 1e3:.0f} ms | "
            f"{r['ttft_p95'] * 1e3:.0f} ms | {r['ttft_p95'] / one['ttft_p95']:.2f}x | "
            f"{r['ttft_p95_steady'] * 1e3:.0f} ms | "
            f"{r['ttft_p95_steady'] / one['ttft_p95']:.2f}x | {r['mismatches']} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--base", default=DEFAULT_BASE_MODEL)
    ap.add_argument("--targets", default="app", help=f"comma list of {', '.join(TARGETS)}")
    ap.add_argument("--clients", default="1,4,8,16", help="concurrency levels")
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--port", type=int, default=7871)
    ap.add_argument("--threads", type=int, help="torch threads in every process (default: "
                    "torch's own); 1 gives steadier numbers on a shared 2-core machine")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "serving.md"))
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    levels = [int(x) for x in args.clients.split(",")]
    base = resolve_base_model(args.base).path
    run = start_run(args.threads)
    with tempfile.TemporaryDirectory(prefix="medchat-concurrency-") as tmp:
        runs = Path(tmp) / "runs"
        runs.mkdir()
        models = prepare_runs(base, runs)
        registry = Registry(runs, base_name=str(base), base_path=base)
        targets = [TARGETS[name](base, runs, max(levels), args.port, args.threads)
                   for name in args.targets.split(",")]
        references = [Generate(base, registry, args.max_new_tokens),
                      MixedGenerate(base, registry, models, args.max_new_tokens)]
        results = list(measure(targets, references, registry, models, levels,
                               args.requests_per_client, args.max_new_tokens).items())
        shutil.rmtree(runs, ignore_errors=True)
    lines = [
        "## Concurrent clients: batched decoding vs plain generate",
        "",
        f"Base `{args.base}` (float32, CPU); models {', '.join(f'`{m}`' for m in models)}; "
        f"greedy, at most {args.max_new_tokens} new tokens, {args.requests_per_client} requests "
        "per client one after another, request k of client i to model (i + k) mod 4 and "
        "question (i + k) mod 4. TTFT = request sent -> first streamed text; *steady* leaves "
        "out each client's first request (the first wave arrives all at once). "
        "*x 1 client* compares with a 1-client run of the same target made just before (the "
        "machine is shared and its load drifts); the 1-client row is the median of those runs. "
        "*answers differing* = greedy answers not identical to the same (model, question) the "
        "first time it was asked.",
        "",
        "| target | clients | requests | answer tokens | tokens/s | x 1 client | TTFT median "
        "| TTFT p95 | x 1 client | TTFT p95 steady | x 1 client | answers differing |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rows in results:
        lines += table(name, rows)
    publish(lines, run, "concurrency.py", argv, Path(args.results), "concurrency",
            RESULTS_HEADER)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
