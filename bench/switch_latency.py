"""Side-by-side: switching the chat model between the base and its adapters.

    python bench/switch_latency.py [--base HuggingFaceTB/SmolLM2-135M-Instruct] [--adapters 1,5,20]
                                   [--switches 10]
                                   [--results bench/results/app.md]

"Switch latency" = the time from choosing a model to the first token of its answer to a short
fixed prompt (greedy, max_new_tokens=1: prompt encoding + prefill + one decoding step),
measured right after a request to a *different* model. The models are visited in a cycle
base -> adapter 1 -> base -> adapter 2 -> ..., the same sequence on both sides:

  ours     medchat.engine: one base in memory, all N adapters attached once at start
           (timed separately, "attach all"), each request routed by name
           (per-call adapter_names, no set_adapter, nothing reloaded).
  reload   what a single-model demo does: for each switch a fresh base
           (`AutoModelForCausalLM.from_pretrained`) plus `PeftModel.from_pretrained(adapter)`,
           then the same prompt (for the base: the fresh base alone).

The adapters are synthetic (r=16 on all linear layers, random non-zero weights, scaled to be
small like a trained one), saved as run folders with manifests like training writes them.
The "switch step" column is the part before generation starts (ours: registry lookup + route;
reload: the two from_pretrained calls). Medians over the switches; same process, same
threads, interleaved switch by switch; the base files are in the OS page cache for both (a
warm-up load runs first).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import statistics
import sys
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from medchat.base_model import resolve_base_model
from medchat.chat_format import ensure_chat_template, prompt_ids
from medchat.engine import Engine, GenerationSettings
from medchat.registry import Registry
from medchat.run_folder import (DEFAULT_SYSTEM_PROMPT, BaseModelRef, ChatSpec, Manifest, Run,
                                atomic_write_text)

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "What is metformin used for?"


def make_runs(base: Path, runs: Path, n: int) -> list[str]:
    """n synthetic adapters as run folders (a0..a{n-1}); returns their run names."""
    # torch, transformers and peft are imported in functions: `--help` answers at once.
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    template = ensure_chat_template(tok)
    names = []
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                  init_lora_weights=False))
    for i in range(n):
        name = f"a{i}"
        torch.manual_seed(i)
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if "lora_" in pname:
                    p.normal_(0, 0.02)
        run = Run.create(name, runs)
        peft_model.save_pretrained(run.adapter_dir)
        run.save_manifest(Manifest(name=name, base_model=BaseModelRef(
            name=str(base), local_path=str(base)), chat=ChatSpec(
            template=template, stop_tokens=[tok.eos_token])))
        names.append(name)
    return names


def cycle(names: list[str], switches: int) -> list[str | None]:
    """base, a0, base, a1, ... (None = base), `switches` entries, each differing from the last."""
    out: list[str | None] = []
    i = 0
    while len(out) < switches:
        out.append(None)
        if len(out) < switches:
            out.append(names[i % len(names)])
            i += 1
    return out


class Ours:
    """medchat.engine with all adapters attached once; each switch routed by name."""

    def __init__(self, base: Path, runs: Path):
        t0 = time.perf_counter()
        self.reg = Registry(runs, base_name=str(base), base_path=base)
        self.eng = Engine(self.reg, device="cpu")
        self.eng.load_base()
        self.load_base = time.perf_counter() - t0
        t1 = time.perf_counter()
        problems = self.eng.preload()
        assert not problems, problems
        self.attach_all = time.perf_counter() - t1
        self.settings = GenerationSettings(max_new_tokens=1, temperature=0.0,
                                           repetition_penalty=1.0)
        self.eng.chat("base", PROMPT, settings=self.settings)  # warm-up (lazy imports)

    def switch(self, name: str | None) -> tuple[float, float]:
        model = "base" if name is None else f"adapter:{name}"
        t = time.perf_counter()
        self.eng.prepare(model)  # what stream() does before generating
        step = time.perf_counter() - t
        self.eng.chat(model, PROMPT, settings=self.settings)
        return time.perf_counter() - t, step


class Reload:
    """A fresh base (+ PeftModel.from_pretrained) for every switch."""

    def __init__(self, base: Path, runs: Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.base, self.runs = base, runs
        self.tok = AutoTokenizer.from_pretrained(base)
        ensure_chat_template(self.tok)
        self.messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                         {"role": "user", "content": PROMPT}]
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)  # warm-up: page cache

    def switch(self, name: str | None) -> tuple[float, float]:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(self.base, dtype=torch.float32).eval()
        if name is not None:
            model = PeftModel.from_pretrained(model, Run(self.runs / name).adapter_dir).eval()
        step = time.perf_counter() - t
        ids = torch.tensor([prompt_ids(self.tok, self.messages)])
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1,
                           do_sample=False, pad_token_id=self.tok.pad_token_id)
        return time.perf_counter() - t, step


def measure(base: Path, runs: Path, names: list[str], switches: int) -> tuple[dict, dict]:
    """Both sides over the same switch sequence, interleaved switch by switch so that both see
    the same background load (this machine is shared)."""
    ours, rel = Ours(base, runs), Reload(base, runs)
    got: dict[str, list[tuple[float, float]]] = {"ours": [], "reload": []}
    for name in cycle(names, switches):
        got["ours"].append(ours.switch(name))
        got["reload"].append(rel.switch(name))

    def summary(rows):
        return {"total": statistics.median(r[0] for r in rows),
                "step": statistics.median(r[1] for r in rows), "n": len(rows)}

    o = summary(got["ours"])
    o.update(attach_all=ours.attach_all, load_base=ours.load_base)
    return o, summary(got["reload"])


def write_section(path: Path, key: str, text: str,
                  header: str = "# Chat app benchmarks\n") -> None:
    """Replace this benchmark's section of the results file (other sections stay); a new file
    starts with `header`."""
    start, end = f"<!-- {key} -->", f"<!-- /{key} -->"
    old = path.read_text(encoding="utf-8") if path.is_file() else header
    block = f"{start}\n{text.rstrip()}\n{end}"
    if start in old and end in old:
        new = old[:old.index(start)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(path, new)


def free_port() -> int:
    """A loopback port nothing listens on now, for a server a benchmark starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_app(proc: subprocess.Popen, port: int, seconds: float) -> None:
    """Read the app's text stdout until it says it serves on `port`, then keep draining it in
    the background (a full pipe would stall the app); stop with its last lines when it exits
    first or does not start within `seconds`."""
    log: list[str] = []
    deadline = time.time() + seconds
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise SystemExit("the app exited:\n" + "".join(log[-40:]))
        log.append(line)
        if f"127.0.0.1:{port}" in line:
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return
    proc.terminate()
    raise SystemExit(f"the app did not start in {seconds:.0f} s:\n" + "".join(log[-40:]))


def machine() -> str:
    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores "
            f"(torch threads {torch.get_num_threads()}), torch {torch.__version__}, "
            f"load average {os.getloadavg()[0]:.1f} at start")


def start_run(threads: int | None) -> tuple[str, str]:
    """Set torch's threads (when given) and return (when the run starts, `machine()`), for
    the report's last lines (`publish`)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), machine()


def publish(lines: list[str], run: tuple[str, str], script: str, argv: list[str] | None,
            results: Path, key: str, header: str) -> str:
    """End a report with when, where and the command that made it; print it and write it as
    section `key` of `results`. `run` is what `start_run` returned."""
    started, host = run
    cmd = f"python bench/{script} " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join(lines + ["", f"Run {started}. Machine: {host}.", "",
                              f"Command: `{cmd.strip()}`"])
    print(text)
    write_section(results, key, text, header)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--base", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    ap.add_argument("--adapters", default="1,5,20", help="numbers of adapters attached")
    ap.add_argument("--switches", type=int, default=10, help="switches timed per row and side")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "app.md"))
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base = resolve_base_model(args.base).path
    counts = [int(x) for x in args.adapters.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="medchat-switch-") as tmp:
        runs = Path(tmp) / "runs"
        all_names = make_runs(base, runs, max(counts))
        for n in counts:
            sub = Path(tmp) / f"runs{n}"
            sub.mkdir()
            for name in all_names[:n]:
                os.symlink(runs / name, sub / name)
            o, r = measure(base, sub, all_names[:n], args.switches)
            rows.append((n, o, r))
            print(f"{n:>2} adapters: ours {o['total'] * 1e3:.1f} ms "
                  f"(step {o['step'] * 1e3:.3f} ms), "
                  f"reload {r['total'] * 1e3:.1f} ms (step {r['step'] * 1e3:.1f} ms), "
                  f"ratio {r['total'] / o['total']:.1f}x; attach all {o['attach_all']:.2f} s",
                  file=sys.stderr)
    cmd = "python bench/switch_latency.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "## Switching models: per-request routing vs reloading per switch",
        "",
        f"Base `{args.base}` (float32, CPU), synthetic LoRA adapters (r=16, all linear layers). "
        "Switch latency = choosing a model -> first token of a short fixed prompt (greedy, "
        "max_new_tokens=1), right after a request to another model; cycle base -> adapter -> "
        "base -> ...; median. *Switch step* = the part before generation (ours: lookup + "
        "route; reload: fresh base + `PeftModel.from_pretrained`).",
        "",
        "| adapters attached | ours: switch -> first token | reload: switch -> first token "
        "| ratio | ours: switch step | reload: switch step | ours: attach all (once, at start) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, o, r in rows:
        lines.append(f"| {n} | {o['total'] * 1e3:.1f} ms | {r['total'] * 1e3:.1f} ms | "
                     f"{r['total'] / o['total']:.1f}x | {o['step'] * 1e3:.3f} ms | "
                     f"{r['step'] * 1e3:.1f} ms | {o['attach_all']:.2f} s |")
    lines += ["", f"Timed switches per row and side: {rows[0][1]['n']}, interleaved (ours, "
              "reload, ours, ...) so both see the same background load. "
              f"Machine: {machine()}.", "", f"Command: `{cmd.strip()}`"]
    text = "\n".join(lines)
    print(text)
    write_section(Path(args.results), "switch_latency", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
