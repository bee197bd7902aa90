"""Side-by-side: `medchat push` / `hub.pull` vs plain huggingface_hub calls on the same run,
against the loopback Hub-compatible server of the tests (tests/fake_hub.py).

    python bench/hub_push.py [--run runs/smollm2-medqa] [--results bench/results/hub.md]

Rows (each into its own fresh repo, then repeated unchanged):
  * medchat push RUN            adapter + card + manifest + eval.json, one commit
  * upload_folder(RUN)          the plain "push the run folder" (checkpoints, logs, data and all)
  * upload_folder(RUN/adapter)  the plain adapter-only upload (no card, no manifest)
  * medchat push --merged RUN   when RUN/merged exists
  * hub.pull vs snapshot_download(local_dir) of the pushed adapter repo, twice each
What is measured at the server: HTTP requests, request-body bytes (what crossed the wire to the
Hub), files in the repo; plus wall time here. Without RUN/adapter a synthetic run is built
(SmolLM2-135M-Instruct + random LoRA r=16 on all linear layers, two Trainer-style checkpoints).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


def synthetic_run(folder: Path) -> Path:
    """An adapter run shaped like a real one: adapter/, manifest, two checkpoints, logs, data."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fake_hub import make_adapter_run
    from training.base_model import DEFAULT_BASE_MODEL, resolve_base_model

    base = resolve_base_model(DEFAULT_BASE_MODEL).path
    run = make_adapter_run(folder, base, name="synthetic", base_hub_id=DEFAULT_BASE_MODEL,
                           with_junk=False)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                  init_lora_weights=False))
    shutil.rmtree(run / "adapter")
    peft_model.save_pretrained(run / "adapter")
    AutoTokenizer.from_pretrained(base).save_pretrained(run / "adapter")
    adapter_bytes = (run / "adapter" / "adapter_model.safetensors").stat().st_size
    for step in (50, 100):  # what HF Trainer leaves with save_total_limit=2
        ck = run / "checkpoints" / f"checkpoint-{step}"
        shutil.copytree(run / "adapter", ck)
        (ck / "optimizer.pt").write_bytes(os.urandom(2 * adapter_bytes))  # Adam: 2 moments
        for name in ("scheduler.pt", "rng_state.pth", "training_args.bin"):
            (ck / name).write_bytes(os.urandom(1500))
        (ck / "trainer_state.json").write_text('{"global_step": %d}\n' % step)
    (run / "logs").mkdir(exist_ok=True)
    (run / "logs" / "loss.jsonl").write_text("".join(f'{{"step": {i}, "loss": 2.0}}\n'
                                                     for i in range(100)))
    (run / "data").mkdir(exist_ok=True)
    (run / "data" / "train.jsonl").write_text('{"conversation": []}\n' * 500)
    return run


class Meter:
    """Requests and bytes the server saw during a block, and its wall time."""

    def __init__(self, hub):
        self.hub = hub

    def __enter__(self):
        self.req0 = sum(self.hub.stats.values())
        self.in0 = sum(self.hub.bytes_in.values())
        self.out0 = sum(self.hub.bytes_out.values())
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.requests = sum(self.hub.stats.values()) - self.req0
        self.sent = sum(self.hub.bytes_in.values()) - self.in0
        self.received = sum(self.hub.bytes_out.values()) - self.out0


def mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(ROOT / "runs" / "smollm2-medqa"))
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "hub.md"))
    args = ap.parse_args(argv)

    import pytest
    from huggingface_hub import HfApi, snapshot_download

    import hub.push as push_mod
    from fake_hub import DEFAULT_USER, FakeHub, use_fake_hub
    from hub.pull import pull

    work = Path(tempfile.mkdtemp(prefix="bench-hub-"))
    run = Path(args.run)
    source = f"`{run}`"
    if not (run / "adapter" / "adapter_config.json").is_file():
        print(f"{run}/adapter missing: building a synthetic run", file=sys.stderr)
        run = synthetic_run(work / "runs")
        source = "synthetic (no trained run found)"
    junk = sum(p.stat().st_size for sub in ("checkpoints", "logs", "data")
               for p in (run / sub).rglob("*") if p.is_file())
    mp = pytest.MonkeyPatch()
    rows: list[tuple[str, Meter, int]] = []
    try:
        with FakeHub(work / "hub") as hub:
            use_fake_hub(mp, hub, home=work / "hf-home")
            api = HfApi()

            def files_in(repo: str) -> int:
                return len(hub.repo_files(repo)) - 1  # minus .gitattributes

            def measure(label: str, repo: str, fn) -> None:
                for attempt in ("first", "again, unchanged"):
                    with Meter(hub) as m:
                        fn()
                    rows.append((f"{label} ({attempt})", m, files_in(repo)))
                    print(f"{rows[-1][0]}: {m.seconds:.2f} s, {m.requests} requests, "
                          f"{mb(m.sent)} MB sent", file=sys.stderr)

            measure("medchat push RUN", f"{DEFAULT_USER}/ours",
                    lambda: push_mod.push(run, f"{DEFAULT_USER}/ours"))

            def plain(repo: str, folder: Path):
                def go():
                    api.create_repo(repo, exist_ok=True)
                    api.upload_folder(folder_path=folder, repo_id=repo)
                return go

            measure("upload_folder(RUN)", f"{DEFAULT_USER}/plain-run",
                    plain(f"{DEFAULT_USER}/plain-run", run))
            measure("upload_folder(RUN/adapter)", f"{DEFAULT_USER}/plain-adapter",
                    plain(f"{DEFAULT_USER}/plain-adapter", run / "adapter"))
            if (run / "merged" / "config.json").is_file():
                measure("medchat push --merged RUN", f"{DEFAULT_USER}/ours-merged",
                        lambda: push_mod.push(run, f"{DEFAULT_USER}/ours-merged", merged=True))

            pulled: list[tuple[str, Meter, int]] = []
            for label, fn in (
                    ("hub.pull (first)", lambda: pull(f"{DEFAULT_USER}/ours", runs_dir=work / "p")),
                    ("hub.pull (again, up to date)",
                     lambda: pull(f"{DEFAULT_USER}/ours", runs_dir=work / "p")),
                    ("snapshot_download(local_dir) (first)",
                     lambda: snapshot_download(f"{DEFAULT_USER}/ours", local_dir=work / "s")),
                    ("snapshot_download(local_dir) (again)",
                     lambda: snapshot_download(f"{DEFAULT_USER}/ours", local_dir=work / "s"))):
                with Meter(hub) as m:
                    fn()
                pulled.append((label, m, 0))
                print(f"{label}: {m.seconds:.2f} s, {m.requests} requests", file=sys.stderr)
            assert not hub.errors, hub.errors[0]
    finally:
        mp.undo()
        shutil.rmtree(work, ignore_errors=True)

    lines = [
        "# Hub push / pull: medchat vs plain huggingface_hub", "",
        f"Command: `python bench/hub_push.py --run {args.run}`  ",
        f"Run: {source}  ",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs (shared), Python "
        f"{platform.python_version()}; huggingface_hub {__import__('huggingface_hub').__version__};"
        " server: tests/fake_hub.py on 127.0.0.1 (loopback, so times are CPU/protocol cost, not "
        "network)", "",
        "| upload | wall s | HTTP requests | MB sent to the Hub | files in repo |",
        "|---|---:|---:|---:|---:|"]
    for label, m, n in rows:
        lines.append(f"| {label} | {m.seconds:.2f} | {m.requests} | {mb(m.sent)} | {n} |")
    lines += ["", "| download | wall s | HTTP requests | MB received |", "|---|---:|---:|---:|"]
    for label, m, _ in pulled:
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
