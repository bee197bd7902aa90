"""Side-by-side: time to first token and tokens/s through the running app vs `generate` directly.

    python bench/app_overhead.py [--base HuggingFaceTB/SmolLM2-135M-Instruct] [--reps 5]
                                 [--max-new-tokens 64] [--threads N]
                                 [--results bench/results/app.md]

  app      `python launch.py` in its own process (as users start it), driven over loopback
           through /chat with the model name and greedy settings, two ways: gradio_client
           (`Client.submit`, iterating the job), and Gradio's plain HTTP API (POST
           /gradio_api/call/chat, then its server-sent events) with httpx; and through its
           OpenAI-compatible /v1/chat/completions with the official `openai` client, streaming.
  engine   medchat.engine in this process without any server (attributes the cost: routing
           and threads vs the web layer).
  direct   the same model in this process: `model.generate` (the base, or
           `PeftModel.from_pretrained(base, adapter)`) with a `TextIteratorStreamer` in a thread,
           the same prompt ids (manifest template + system prompt), greedy, same max_new_tokens.

TTFT = from the call (client.submit / building the prompt) to the first non-empty text piece.
Decode rate = new tokens / (last piece - first piece) — tokens after the first, per second.
Both sides must produce the same text (checked), so they count the same tokens. Runs are
interleaved (direct, app, direct, app, ...) so both see the same background load; medians.
The adapter is synthetic (r=16, all linear layers, random small weights).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

from switch_latency import (free_port, machine, make_runs, wait_for_app,  # this script's folder
                            write_section)

from medchat.base_model import resolve_base_model
from medchat.chat_format import ensure_chat_template, prompt_ids
from medchat.engine import Engine, GenerationSettings
from medchat.registry import Registry
from medchat.run_folder import DEFAULT_SYSTEM_PROMPT, Run

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "How should I take metformin, and what side effects should I watch for?"


def start_app(base: Path, runs: Path, port: int, threads: int | None) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1",
               GRADIO_ANALYTICS_ENABLED="False", TOKENIZERS_PARALLELISM="false")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in the app process
    env.pop("SPACE_ID", None)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "launch.py"), "--runs", str(runs), "--base", str(base),
         "--port", str(port), "--device", "cpu", "--concurrency", "1"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_app(proc, port, 300)
    return proc


class Direct:
    def __init__(self, base: Path, adapter: Path | None):
        # torch, transformers, peft and gradio are imported in functions: `--help` answers at once
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(base)
        ensure_chat_template(self.tok)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter).eval()
        self.model = model
        self.messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                         {"role": "user", "content": QUESTION}]

    def run(self, max_new_tokens: int) -> dict:
        import torch
        from transformers import TextIteratorStreamer

        t0 = time.perf_counter()
        ids = torch.tensor([prompt_ids(self.tok, self.messages)])
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        out: dict = {}

        def gen():
            with torch.inference_mode():
                out["ids"] = self.model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.0,
                    eos_token_id=self.tok.eos_token_id, pad_token_id=self.tok.pad_token_id,
                    streamer=streamer)

        th = threading.Thread(target=gen)
        th.start()
        first = last = None
        text = ""
        for piece in streamer:
            if piece:
                now = time.perf_counter()
                first = first or now
                last = now
                text += piece
        th.join()
        n = int(out["ids"].shape[1] - ids.shape[1])
        return {"ttft": first - t0, "first": first, "last": last, "text": text, "tokens": n,
                "total": last - t0}


def via_app(client, model: str, max_new_tokens: int) -> dict:
    t0 = time.perf_counter()
    job = client.submit(QUESTION, [], model, "", max_new_tokens, 0.0, 1.0, 1.0, -1,
                        api_name="/chat")
    first = last = None
    text = ""
    for out in job:
        if out:
            now = time.perf_counter()
            first = first or now
            last = now
            text = out
    return {"ttft": first - t0, "first": first, "last": last, "text": text, "total": last - t0}


def via_engine(engine, model: str, max_new_tokens: int) -> dict:
    """medchat.engine in this process, no server: isolates the engine's own cost (per-request
    routing hooks, prompt building, generation thread) from the web layer's."""
    t0 = time.perf_counter()
    stream = engine.stream_turn(model, QUESTION, settings=GenerationSettings(
        max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, repetition_penalty=1.0))
    first = last = None
    for piece in stream:
        now = time.perf_counter()
        first = first or now
        last = now
    return {"ttft": first - t0, "first": first, "last": last, "text": stream.text,
            "total": last - t0}


def via_http(http, url: str, model: str, max_new_tokens: int) -> dict:
    """The same /chat endpoint over Gradio's plain HTTP + server-sent-events API (what any HTTP
    client sees, without gradio_client's own per-job machinery)."""
    import json

    t0 = time.perf_counter()
    data = [QUESTION, [], model, "", max_new_tokens, 0.0, 1.0, 1.0, -1]
    event_id = http.post(f"{url}gradio_api/call/chat", json={"data": data}).json()["event_id"]
    first = last = None
    text = ""
    event = None
    with http.stream("GET", f"{url}gradio_api/call/chat/{event_id}") as resp:
        for line in resp.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and event in ("generating", "complete"):
                payload = json.loads(line[5:])
                out = payload[0] if isinstance(payload, list) and payload else ""
                if out and event == "generating":
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    text = out
                if event == "complete":
                    text = out or text
                    break
            elif line.startswith("data:") and event == "error":
                raise SystemExit(f"{model}: the app answered with an error: {line}")
    return {"ttft": first - t0, "first": first, "last": last, "text": text, "total": last - t0}


def via_v1(client, model: str, max_new_tokens: int) -> dict:
    """The app's OpenAI-compatible API, streaming, with the official client."""
    t0 = time.perf_counter()
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], stream=True,
        max_tokens=max_new_tokens, temperature=0.0, top_p=1.0,
        extra_body={"repetition_penalty": 1.0})
    first = last = None
    text = ""
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            first = first or now
            last = now
            text += chunk.choices[0].delta.content
    return {"ttft": first - t0, "first": first, "last": last, "text": text, "total": last - t0}


def transport_floor(reps: int) -> dict[str, float]:
    """Time to the first streamed output of a trivial Gradio generator (no model): what the two
    client paths cost by themselves, on the same machine, in this run."""
    import gradio as gr
    import httpx
    from gradio_client import Client

    def echo(n: int) -> Iterator[str]:
        text = ""
        for _ in range(n):
            text += "x "
            yield text

    with gr.Blocks(analytics_enabled=False) as demo:
        gr.api(echo, api_name="echo")
    port = free_port()
    demo.queue().launch(server_port=port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    client, http = Client(url, verbose=False), httpx.Client(timeout=60)
    got: dict[str, list[float]] = {"gradio_client": [], "HTTP/SSE": []}
    try:
        for _ in range(reps + 1):  # the first round warms up
            t = time.perf_counter()
            job = client.submit(3, api_name="/echo")
            for out in job:
                if out:
                    got["gradio_client"].append(time.perf_counter() - t)
                    break
            job.result()
            t = time.perf_counter()
            eid = http.post(f"{url}gradio_api/call/echo", json={"data": [3]}).json()["event_id"]
            with http.stream("GET", f"{url}gradio_api/call/echo/{eid}") as resp:
                for line in resp.iter_lines():
                    if line.startswith("data:") and "x" in line:
                        got["HTTP/SSE"].append(time.perf_counter() - t)
                        break
    finally:
        demo.close()
    return {k: statistics.median(v[1:]) for k, v in got.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--base", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads on both sides (default: torch's; 1 is steadier on a "
                         "shared machine)")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "app.md"))
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:  # before torch is imported, so every thread of this process uses it
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        import torch

        torch.set_num_threads(args.threads)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    from gradio_client import Client

    base = resolve_base_model(args.base).path
    load = os.getloadavg()[0]
    floor = transport_floor(max(args.reps, 5))
    results: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory(prefix="medchat-app-bench-") as tmp:
        runs = Path(tmp) / "runs"
        make_runs(base, runs, 1)
        port = free_port()
        proc = start_app(base, runs, port, args.threads)
        try:
            import httpx

            url = f"http://127.0.0.1:{port}/"
            client = Client(url, verbose=False)
            http = httpx.Client(timeout=300)
            import openai

            v1 = openai.OpenAI(base_url=url + "v1", api_key="bench", max_retries=0, timeout=300)
            sides = {"base": Direct(base, None),
                     "adapter:a0": Direct(base, Run(runs / "a0").adapter_dir)}
            engine = Engine(Registry(runs, base_name=str(base), base_path=base), device="cpu")
            engine.load_base()
            engine.preload()
            for model, direct in sides.items():  # warm-up every path once
                direct.run(8)
                via_engine(engine, model, 8)
                via_app(client, model, 8)
                via_http(http, url, model, 8)
                via_v1(v1, model, 8)
            for model, direct in sides.items():
                results[model] = {"direct": [], "engine": [], "app": [], "http": [], "v1": []}
                for _ in range(args.reps):
                    d = direct.run(args.max_new_tokens)
                    e = via_engine(engine, model, args.max_new_tokens)
                    a = via_app(client, model, args.max_new_tokens)
                    h = via_http(http, url, model, args.max_new_tokens)
                    o = via_v1(v1, model, args.max_new_tokens)
                    for side, got in (("engine", e), ("app", a), ("http", h), ("v1", o)):
                        if got["text"] != d["text"]:
                            raise SystemExit(f"{model}: the app ({side}) and generate disagree:\n"
                                             f"app:    {got['text'][:200]!r}\n"
                                             f"direct: {d['text'][:200]!r}")
                        got["tokens"] = d["tokens"]
                        results[model][side].append(got)
                    results[model]["direct"].append(d)
        finally:
            proc.terminate()
            proc.wait(30)

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    def rate(rows):
        return statistics.median((r["tokens"] - 1) / (r["last"] - r["first"]) for r in rows)

    cmd = "python bench/app_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "## Streaming through the app vs calling generate directly",
        "",
        f"Base `{args.base}` (float32, CPU), greedy, {args.max_new_tokens} new tokens max, "
        "same prompt ids on both sides (identical output text, checked). App = `python "
        "launch.py` in its own process, measured with gradio_client over loopback; direct = "
        "`model.generate` + `TextIteratorStreamer` in this process (for the adapter: "
        "`PeftModel.from_pretrained`); engine = medchat.engine in-process, no server. The app "
        "is called three ways: gradio_client, Gradio's "
        "plain HTTP API (POST + server-sent events, httpx), and its OpenAI-compatible /v1 "
        "(the openai client, streaming). TTFT = call -> first text piece; "
        "decode = tokens after the first / (last piece - first piece). Medians.",
        "",
        "| model | measured | tokens | direct TTFT | TTFT | TTFT added | direct decode "
        "| decode | decode lost |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model, r in results.items():
        dt, dr = med(r["direct"], "ttft"), rate(r["direct"])
        for side, via in (("engine", "engine, in-process (no server)"),
                          ("app", "app, gradio_client"), ("http", "app, HTTP/SSE"),
                          ("v1", "app, /v1 (openai client)")):
            at, ar = med(r[side], "ttft"), rate(r[side])
            lines.append(f"| {model} | {via} | {r['direct'][0]['tokens']} | {dt * 1e3:.0f} ms | "
                         f"{at * 1e3:.0f} ms | {(at - dt) * 1e3:+.0f} ms "
                         f"({(at - dt) / dt * 100:+.1f}%) "
                         f"| {dr:.1f} tok/s | {ar:.1f} tok/s | {(dr - ar) / dr * 100:+.1f}% |")
            print(lines[-1], file=sys.stderr)
    lines += ["", "The OpenAI-compatible /v1 against the in-process engine it serves (one client, "
              "medians): " + "; ".join(
                  f"{model}: TTFT {med(r['v1'], 'ttft') * 1e3:.0f} vs "
                  f"{med(r['engine'], 'ttft') * 1e3:.0f} ms "
                  f"({(med(r['v1'], 'ttft') / med(r['engine'], 'ttft') - 1) * 100:+.1f}%), decode "
                  f"{rate(r['v1']):.1f} vs {rate(r['engine']):.1f} tok/s "
                  f"({(rate(r['v1']) / rate(r['engine']) - 1) * 100:+.1f}%)"
                  for model, r in results.items()) + "."]
    lines += ["", "Transport floor (same machine, same run): time to the first streamed output "
              "of a trivial Gradio generator with no model: "
              + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in floor.items()) + "."]
    lines += ["", f"{args.reps} runs per side and model, interleaved (direct, app, direct, ...). "
              f"Machine: {machine().rsplit(', load', 1)[0]}, load average {load:.1f} at start.",
              "", f"Command: `{cmd.strip()}`"]
    text = "\n".join(lines)
    print(text)
    write_section(Path(args.results), "app_overhead", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
