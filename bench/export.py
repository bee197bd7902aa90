"""GGUF export: time and file size per type, and decode speed of the GGUF in llama.cpp vs the
merged model in transformers, side by side on this machine.

    python bench/export.py [--run RUN] [--types f16,q8_0] [--tokens 64] [--repeat 3]
                           [--threads 1] [--results bench/results/export.md]

The run is copied to a scratch folder first (an export writes into the run, and a benchmark must
not change the run it measures). Without --run, a stand-in run is made: the default base
(SmolLM2-135M-Instruct) with a random LoRA (r 4 on q/v/up projections), merged.

Per type: `medchat export gguf` (training.export.export_gguf, llama.cpp's converter plus the
checks) is timed and the GGUF's size recorded. Decode speed: llama.cpp's llama-server (built by
`make llama-server`) serves the GGUF with --threads threads and generates --tokens tokens
greedily (ignore_eos) from the run's chat prompt; its own timings give decode tokens/s.
transformers generates the same number of tokens from the same prompt ids with the merged model
(float32, torch on --threads threads); decode tokens/s = (N - 1) / (time for N tokens - time
for 1 token). Medians of --repeat runs. One thread is the default: on a shared 2-core machine
llama.cpp's spinning threads slow down many times over when another process takes a core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from medchat.base_model import DEFAULT_BASE_MODEL, resolve_base_model
from medchat.chat_format import prompt_ids
from medchat.run_folder import (DEFAULT_SYSTEM_PROMPT, BaseModelRef, ChatSpec, Manifest, Run,
                                atomic_write_text)
from training.export import export_gguf, llama_server
from training.merge import merge_run

from switch_latency import free_port  # this script's folder

# torch, peft and transformers are imported in functions: only the stand-in run and the
# transformers side need them.

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "How should I store insulin pens?"
SECTION = "export"


def stand_in_run(folder: Path) -> Run:
    """SmolLM2-135M-Instruct + a random LoRA (B moved from zero), as a short fine-tune."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = resolve_base_model(DEFAULT_BASE_MODEL).path
    run = Run(folder)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8,
                                                  target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.01)
    peft_model.save_pretrained(run.adapter_dir)
    tok = AutoTokenizer.from_pretrained(base)
    run.save_manifest(Manifest(
        name=run.name, base_model=BaseModelRef(name=DEFAULT_BASE_MODEL, hub_id=DEFAULT_BASE_MODEL,
                                               local_path=str(base)),
        chat=ChatSpec(template=tok.chat_template, system_prompt=DEFAULT_SYSTEM_PROMPT,
                      stop_tokens=["<|im_end|>"])))
    return run


def scratch_copy(run: Run, into: Path) -> Run:
    target = into / run.name
    shutil.copytree(run.path, target, ignore=shutil.ignore_patterns(
        "checkpoints", "logs", "gguf", ".*"))
    return Run(target)


def llama_cpp_decode(binary: Path, gguf: Path, prompt: list[int], tokens: int,
                     repeat: int, threads: int) -> dict:
    """Decode tokens/s reported by llama-server for `tokens` greedy tokens after `prompt`."""
    port = free_port()
    proc = subprocess.Popen([str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port",
                             str(port), "-c", "2048", "-np", "1", "-t", str(threads)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.perf_counter()
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.perf_counter() - t0 > 180:
                    raise SystemExit(f"llama-server did not start for {gguf.name}")
                time.sleep(0.5)
        started = time.perf_counter() - t0
        rates, prompt_rates = [], []
        for i in range(repeat + 1):  # the first request warms up
            body = {"prompt": prompt, "n_predict": tokens, "ignore_eos": True, "temperature": 0,
                    "top_k": 0, "min_p": 0, "repeat_penalty": 1.0, "cache_prompt": False}
            req = urllib.request.Request(url + "/completion", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=600) as r:
                timings = json.loads(r.read())["timings"]
            if i:
                rates.append(timings["predicted_per_second"])
                prompt_rates.append(timings["prompt_per_second"])
        return {"decode": statistics.median(rates), "prefill": statistics.median(prompt_rates),
                "start_s": started}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def transformers_decode(merged: Path, prompt: list[int], tokens: int, repeat: int,
                        threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    x = torch.tensor([prompt])

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0

    timed(4)  # warm-up
    rates = []
    for _ in range(repeat):
        one, full = timed(1), timed(tokens)
        rates.append((tokens - 1) / (full - one))
    return {"decode": statistics.median(rates)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="run name or folder (default: a stand-in SmolLM2 run)")
    ap.add_argument("--types", default="f16,q8_0")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "export.md"))
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    binary = llama_server()
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        if args.run:
            run = scratch_copy(Run.open(args.run), Path(tmp))
            label = f"run `{Run.open(args.run).name}`"
        else:
            run = stand_in_run(Path(tmp) / "stand-in")
            label = ("stand-in run: SmolLM2-135M-Instruct + a random LoRA (r 4, q/v/up), "
                     "merged")
        if not run.has_merged():
            merge_run(run, check_prompts=0, progress=False)
        from transformers import AutoTokenizer

        manifest = run.manifest()
        tok = AutoTokenizer.from_pretrained(run.merged_dir)
        prompt = prompt_ids(tok, [{"role": "system", "content": manifest.chat.system_prompt},
                                  {"role": "user", "content": QUESTION}])
        rows = []
        for t in types:
            t0 = time.perf_counter()
            result = export_gguf(run, t, overwrite=True, progress=False)
            wall = time.perf_counter() - t0
            gguf = result.folder / result.files[0].name
            speed = llama_cpp_decode(binary, gguf, prompt, args.tokens, args.repeat,
                                     args.threads)
            rows.append({"type": t, "export_s": wall, "convert_s": result.seconds["convert_model"],
                         "mb": gguf.stat().st_size / 1e6, **speed})
            print(rows[-1], flush=True)
        hf = transformers_decode(run.merged_dir, prompt, args.tokens, args.repeat, args.threads)
        merged_mb = sum(p.stat().st_size for p in run.merged_dir.glob("*.safetensors")) / 1e6
        print(hf, flush=True)
    write_results(Path(args.results), rows, hf, merged_mb, label, args, len(prompt))
    return 0


def write_results(path: Path, rows: list[dict], hf: dict, merged_mb: float, label: str,
                  args, prompt_len: int) -> None:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    lines = [f"<!-- {SECTION} -->", "## GGUF export: time, size and decode speed", "",
             f"{label}. Export = `medchat export gguf RUN --type T` (llama.cpp's converter from "
             "llama-cpp-python 0.3.36's source, the read-back checks, Modelfile), wall time; "
             "convert = the converter subprocess alone. Decode: greedy, "
             f"{args.tokens} new tokens after a {prompt_len}-token chat prompt, median of "
             f"{args.repeat}; llama.cpp = llama-server ({args.threads} thread(s), its own "
             f"timings), transformers = the merged model in float32 (torch, {args.threads} "
             "thread(s)).", "",
             "| model | file | size | export | convert | decode tok/s | prefill tok/s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| llama.cpp | GGUF {r['type']} | {r['mb']:.1f} MB | {r['export_s']:.1f} s | "
                     f"{r['convert_s']:.1f} s | {r['decode']:.1f} | {r['prefill']:.1f} |")
    lines.append(f"| transformers | merged safetensors (float32) | {merged_mb:.1f} MB | – "
                 f"| – | {hf['decode']:.1f} | – |")
    lines += ["", f"Machine: {cpu}, {os.cpu_count()} CPU cores, load average "
              f"{os.getloadavg()[0]:.1f} at the end; {time.strftime('%Y-%m-%d')}.", "",
              f"Command: `python bench/export.py{' --run ' + args.run if args.run else ''}"
              f"{' --types ' + args.types if args.types != 'f16,q8_0' else ''}"
              f"{' --threads ' + str(args.threads) if args.threads != 1 else ''}`",
              f"<!-- /{SECTION} -->", ""]
    block = "\n".join(lines)
    old = path.read_text(encoding="utf-8") if path.is_file() else "# GGUF export benchmarks\n\n"
    start, end = old.find(f"<!-- {SECTION} -->"), old.find(f"<!-- /{SECTION} -->")
    new = (old[:start] + block + old[end + len(f"<!-- /{SECTION} -->\n"):]
           if start >= 0 and end > start else old.rstrip("\n") + "\n\n" + block)
    atomic_write_text(path, new)
    print(f"results -> {path}")


if __name__ == "__main__":
    raise SystemExit(main())
