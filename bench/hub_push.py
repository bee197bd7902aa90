"""Side-by-side: `medchat push` / `hub.pull` vs plain huggingface_hub calls on the same run,
against the loopback Hub-compatible server of the tests, started as its own process
(`python -m tests.support.fake_hub`).

    python bench/hub_push.py [--run runs/smollm2-medqa] [--results bench/results/hub.md]

(from the repository root, with medchat installed, e.g. `pip install -e .`)

Rows (each into its own fresh repo, then repeated unchanged):
  * medchat push RUN            adapter + card + manifest + evaluation results, one commit
  * upload_folder(RUN)          the plain "push the run folder" (checkpoints, logs, data and all)
  * upload_folder(RUN/adapter)  the plain adapter-only upload (no card, no manifest)
  * medchat push --merged RUN   when the run has a merged model
  * hub.pull vs snapshot_download(local_dir) of the pushed adapter repo, twice each
What is measured at the server: HTTP requests, request-body bytes (what crossed the wire to the
Hub), files in the repo; plus wall time here. Without a trained RUN a synthetic run is built
(SmolLM2-135M-Instruct + random LoRA r=16 on all linear layers, two Trainer-style checkpoints).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# huggingface_hub reads these when it is imported (below, through hub): the loopback Hub speaks
# plain LFS (no Xet), and the bench must reach it even where HF_HUB_OFFLINE is set. The endpoint
# and token are read at each call, so main() sets them once the server is up.
os.environ.update({"HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
                   "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"})

import huggingface_hub  # noqa: E402
from huggingface_hub import HfApi, snapshot_download  # noqa: E402

from hub.pull import pull  # noqa: E402
from hub.push import push  # noqa: E402
from medchat.base_model import DEFAULT_BASE_MODEL, resolve_base_model  # noqa: E402
from medchat.run_folder import (BaseModelRef, ChatSpec, GenerationDefaults, Manifest,  # noqa: E402
                                Metrics, ModelScores, Run)

ROOT = Path(__file__).resolve().parents[1]
USER = "bench-user"
TOKEN = "hf_BenchFakeHubToken0123456789abcdefXYZ"  # accepted by the loopback server only


def synthetic_run(runs_dir: Path) -> Run:
    """An adapter run shaped like a real one: adapter, manifest, two checkpoints, logs, data."""
    # torch, transformers and peft are imported here: only this fallback needs them
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = resolve_base_model(DEFAULT_BASE_MODEL).path
    run = Run.create("synthetic", runs_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                  init_lora_weights=False))
    peft_model.save_pretrained(run.adapter_dir)
    tok.save_pretrained(run.adapter_dir)
    run.save_manifest(Manifest(
        name=run.name,
        base_model=BaseModelRef(name=DEFAULT_BASE_MODEL, hub_id=DEFAULT_BASE_MODEL,
                                local_path=str(base)),
        chat=ChatSpec(template=tok.chat_template, stop_tokens=[tok.eos_token],
                      generation=GenerationDefaults()),
        metrics=Metrics(models={"base": ModelScores(loss=3.1), "adapter": ModelScores(loss=2.4)})))
    adapter_bytes = (run.adapter_dir / "adapter_model.safetensors").stat().st_size
    for step in (50, 100):  # what HF Trainer leaves with save_total_limit=2
        ck = run.checkpoints_dir / f"checkpoint-{step}"
        shutil.copytree(run.adapter_dir, ck)
        (ck / "optimizer.pt").write_bytes(os.urandom(2 * adapter_bytes))  # Adam: 2 moments
        for name in ("scheduler.pt", "rng_state.pth", "training_args.bin"):
            (ck / name).write_bytes(os.urandom(1500))
        (ck / "trainer_state.json").write_text('{"global_step": %d}\n' % step)
    run.loss_log_path.parent.mkdir(parents=True, exist_ok=True)
    run.loss_log_path.write_text("".join(f'{{"step": {i}, "loss": 2.0}}\n' for i in range(100)))
    run.split_path("train").parent.mkdir(parents=True, exist_ok=True)
    run.split_path("train").write_text('{"conversation": []}\n' * 500)
    return run


# ---------------------------------------------------------------------------------------------
# The loopback Hub, in its own process


class LoopbackHub:
    """`python -m tests.support.fake_hub` on a free port; its counters read over HTTP."""

    def __init__(self, storage: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.fake_hub", "--port", str(port), "--storage",
             str(storage), "--token", f"{TOKEN}:{USER}"], cwd=ROOT, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the loopback Hub exited with {self.proc.returncode}")
            try:
                self.state()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the loopback Hub did not answer at {self.url}")
                time.sleep(0.2)

    def state(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/_fake/state", timeout=10) as r:
            return json.loads(r.read())

    def files_in(self, repo: str) -> int:
        return self.state()["repo_files"][f"model:{repo}"] - 1  # minus .gitattributes

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Meter:
    """Requests and bytes the server saw during a block, and its wall time."""

    def __init__(self, hub: LoopbackHub):
        self.hub = hub

    @staticmethod
    def _totals(state: dict) -> tuple[int, int, int]:
        return (sum(state["stats"].values()), sum(state["bytes_in"].values()),
                sum(state["bytes_out"].values()))

    def __enter__(self):
        self.start = self._totals(self.hub.state())
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        end = self._totals(self.hub.state())
        self.requests, self.sent, self.received = (b - a for a, b in zip(self.start, end))


def mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(ROOT / "runs" / "smollm2-medqa"))
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "hub.md"))
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-hub-"))
    server = LoopbackHub(work / "hub")
    os.environ.update({"HF_ENDPOINT": server.url, "HF_TOKEN": TOKEN,
                       "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"})
    rows: list[tuple[str, Meter, int]] = []
    pulled: list[tuple[str, Meter]] = []
    try:
        source = f"`{args.run}`"
        try:
            run = Run.open(args.run)
            if not run.has_adapter():
                raise FileNotFoundError(run.adapter_dir)
        except (OSError, ValueError):
            print(f"{args.run}: no trained run with an adapter; building a synthetic run",
                  file=sys.stderr)
            run = synthetic_run(work / "runs")
            source = "synthetic (no trained run found)"
        junk = sum(p.stat().st_size for sub in (run.checkpoints_dir, run.logs_dir, run.data_dir)
                   for p in sub.rglob("*") if p.is_file())
        api = HfApi(endpoint=server.url, token=TOKEN)

        def measure(label: str, repo: str, fn) -> None:
            for attempt in ("first", "again, unchanged"):
                with Meter(server) as m:
                    fn()
                rows.append((f"{label} ({attempt})", m, server.files_in(repo)))
                print(f"{rows[-1][0]}: {m.seconds:.2f} s, {m.requests} requests, "
                      f"{mb(m.sent)} MB sent", file=sys.stderr)

        def plain(repo: str, folder: Path):
            def go():
                api.create_repo(repo, exist_ok=True)
                api.upload_folder(folder_path=folder, repo_id=repo)
            return go

        ours = f"{USER}/ours"
        measure("medchat push RUN", ours, lambda: push(run, ours))
        measure("upload_folder(RUN)", f"{USER}/plain-run", plain(f"{USER}/plain-run", run.path))
        measure("upload_folder(RUN/adapter)", f"{USER}/plain-adapter",
                plain(f"{USER}/plain-adapter", run.adapter_dir))
        if run.has_merged():
            measure("medchat push --merged RUN", f"{USER}/ours-merged",
                    lambda: push(run, f"{USER}/ours-merged", merged=True))

        for label, fn in (
                ("hub.pull (first)", lambda: pull(ours, runs_dir=work / "p")),
                ("hub.pull (again, up to date)", lambda: pull(ours, runs_dir=work / "p")),
                ("snapshot_download(local_dir) (first)",
                 lambda: snapshot_download(ours, local_dir=work / "s", endpoint=server.url)),
                ("snapshot_download(local_dir) (again)",
                 lambda: snapshot_download(ours, local_dir=work / "s", endpoint=server.url))):
            with Meter(server) as m:
                fn()
            pulled.append((label, m))
            print(f"{label}: {m.seconds:.2f} s, {m.requests} requests", file=sys.stderr)
        errors = server.state()["errors"]
        if errors:
            raise RuntimeError(f"the loopback Hub failed:\n{errors[0]}")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    lines = [
        "# Hub push / pull: medchat vs plain huggingface_hub", "",
        f"Command: `python bench/hub_push.py --run {args.run}`  ",
        f"Run: {source}  ",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs (shared), Python "
        f"{platform.python_version()}; huggingface_hub {huggingface_hub.__version__};"
        " server: `python -m tests.support.fake_hub` on 127.0.0.1 (loopback, in its own process, "
        "so times are CPU/protocol cost, not network)", "",
        "| upload | wall s | HTTP requests | MB sent to the Hub | files in repo |",
        "|---|---:|---:|---:|---:|"]
    for label, m, n in rows:
        lines.append(f"| {label} | {m.seconds:.2f} | {m.requests} | {mb(m.sent)} | {n} |")
    lines += ["", "| download | wall s | HTTP requests | MB received |", "|---|---:|---:|---:|"]
    for label, m in pulled:
        lines.append(f"| {label} | {m.seconds:.2f} | {m.requests} | {mb(m.received)} |")
    if junk:
        lines += ["", f"checkpoints/ + logs/ + data/ of the run: {mb(junk)} MB (never pushed by "
                      "medchat; uploaded by a plain upload_folder of the run folder)."]
    text = "\n".join(lines) + "\n"
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
