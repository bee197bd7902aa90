"""Side-by-side: our streaming merge (`medchat merge`) vs peft's merge_and_unload() +
save_pretrained.

    python bench/merge_memory.py [--run smollm2-medqa] [--max-shard-size 100MB] [--repeat 1]
                                 [--results bench/results/merge.md]

Each merge runs in its own subprocess, one after the other, and its peak resident memory is
that child's own `ru_maxrss` (os.wait4), so the peaks are independent of each other and of
this script. A `python -c "import torch"` child gives the interpreter floor. Then the outputs
are compared tensor by tensor (max |difference|). With a trained run, its adapter is merged
into the base its manifest names; without one, a synthetic adapter (r=16, all linear layers,
random non-zero weights) on the default base is used.

Our merge runs as `medchat merge --base B --adapter A --output O` into a scratch folder rather
than as `medchat merge RUN` (training.merge.merge_run): the run-level merge records its result
in the run's manifest, and a benchmark must not change the run it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from medchat.base_model import resolve_base_model, resolve_ref
from medchat.run_folder import Run, RunNotFoundError

# torch, peft and transformers are imported in functions: only the synthetic-adapter child and
# the final comparison need them, and the parent's own memory is not what is measured.

ROOT = Path(__file__).resolve().parents[1]


def run_child(cmd: list[str], label: str) -> dict:
    """Run `cmd`; return wall seconds and the child's own peak RSS (MB)."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed ({proc.returncode}):\n{out[-3000:]}")
    return {"label": label, "seconds": wall, "peak_mb": usage.ru_maxrss / 1024}  # Linux: KiB


def make_synthetic(base: str, out: Path) -> None:
    """r=16 all-linear LoRA with random (non-zero) A and B, saved like training saves it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                  init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(0.05)  # keep the update small, like a trained one
    peft_model.save_pretrained(out)


def compare(a: Path, b: Path) -> dict:
    """Max |a - b| over the tensors of two model folders (float32), and the key sets."""
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, Path]:
        idx = folder / "model.safetensors.index.json"
        if idx.is_file():
            return {k: folder / v for k, v in json.loads(idx.read_text())["weight_map"].items()}
        f = folder / "model.safetensors"
        with safe_open(str(f), "pt") as h:
            return {k: f for k in h.keys()}

    ta, tb = tensors(a), tensors(b)
    worst, worst_name = 0.0, None
    for k in sorted(set(ta) & set(tb)):
        with safe_open(str(ta[k]), "pt") as fa, safe_open(str(tb[k]), "pt") as fb:
            d = (fa.get_tensor(k).float() - fb.get_tensor(k).float()).abs().max().item()
        if d > worst:
            worst, worst_name = d, k
    return {"common": len(set(ta) & set(tb)), "only_a": sorted(set(ta) - set(tb)),
            "only_b": sorted(set(tb) - set(ta)), "max_abs_diff": worst, "worst": worst_name}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="smollm2-medqa",
                    help="run name or folder whose adapter to merge (else a synthetic adapter)")
    ap.add_argument("--base", help="base model folder (default: the run's, else the default base)")
    ap.add_argument("--max-shard-size", default="100MB", help="shard size for the low-memory row")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each; the lowest time is kept")
    ap.add_argument("--results", help="write the markdown table here (e.g. bench/results/merge.md)")
    ap.add_argument("--synthetic-adapter", help=argparse.SUPPRESS)  # child mode: BASE::OUT
    args = ap.parse_args(argv)
    if args.synthetic_adapter:
        base, out = args.synthetic_adapter.split("::")
        make_synthetic(base, Path(out))
        return 0

    try:
        run = Run.open(args.run)
    except RunNotFoundError:
        run = None
    work = Path(tempfile.mkdtemp(prefix="merge-bench-"))
    if run is not None and run.has_adapter():
        adapter, source = run.adapter_dir, f"trained run `{run.name}`"
        base = Path(args.base) if args.base else resolve_ref(run.manifest().base_model).path
    else:
        base = Path(args.base) if args.base else resolve_base_model().path
        adapter, source = work / "adapter", "synthetic adapter (r=16, all linear layers)"
        run_child([sys.executable, __file__, "--synthetic-adapter", f"{base}::{adapter}"], "synthetic")
    size_mb = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 1e6
    print(f"base {base} ({size_mb:.0f} MB safetensors), adapter: {source}", file=sys.stderr)

    py = sys.executable
    jobs = [
        ("python + import torch (floor)", [py, "-c", "import torch, safetensors"], None),
        ("peft merge_and_unload + save_pretrained",
         [py, "bench/peft_merge.py", "--base", str(base), "--adapter", str(adapter),
          "--output", str(work / "peft")], work / "peft"),
        ("ours, --max-shard-size 2GB (default)",
         [py, "-m", "medchat", "merge", "--base", str(base), "--adapter", str(adapter), "--output",
          str(work / "ours-2GB"), "--check-prompts", "0", "--quiet", "--overwrite"], work / "ours-2GB"),
        (f"ours, --max-shard-size {args.max_shard_size}",
         [py, "-m", "medchat", "merge", "--base", str(base), "--adapter", str(adapter), "--output",
          str(work / "ours-small"), "--max-shard-size", args.max_shard_size, "--check-prompts", "0",
          "--quiet", "--overwrite"], work / "ours-small"),
    ]
    rows = []
    for label, cmd, out in jobs:
        best = None
        for _ in range(max(args.repeat, 1)):
            if out is not None and out.exists():
                shutil.rmtree(out)
            r = run_child(cmd, label)
            best = r if best is None else {**r, "seconds": min(r["seconds"], best["seconds"]),
                                            "peak_mb": max(r["peak_mb"], best["peak_mb"])}
            print(f"  {label}: {r['seconds']:.1f} s, peak RSS {r['peak_mb']:.0f} MB", file=sys.stderr)
        best["out"] = out
        rows.append(best)

    peft_row = rows[1]
    diffs = {r["label"]: compare(peft_row["out"], r["out"]) for r in rows[2:]}
    lines = [
        f"Base: `{base.name}` ({size_mb:.0f} MB, one safetensors file); adapter: {source}.",
        "",
        "| merge | wall time (s) | peak RSS (MB) | peak vs peft | max abs diff vs peft | output shards |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        shards = len(list(r["out"].glob("*.safetensors"))) if r["out"] else ""
        d = diffs.get(r["label"])
        diff = f"{d['max_abs_diff']:.3g} ({d['common']} tensors)" if d else ("reference" if r is peft_row else "")
        ratio = f"{r['peak_mb'] / peft_row['peak_mb']:.2f}x" if r["out"] else ""
        lines.append(f"| {r['label']} | {r['seconds']:.1f} | {r['peak_mb']:.0f} | {ratio} | {diff} | {shards} |")
    for label, d in diffs.items():
        if d["only_a"] or d["only_b"]:
            lines.append(f"\n{label}: only in peft output: {d['only_a']}; only in ours: {d['only_b']}")
    import peft
    import torch
    import transformers

    lines += ["", f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
              f"(shared), Python {platform.python_version()}, torch {torch.__version__}, "
              f"transformers {transformers.__version__}, peft {peft.__version__}. "
              "Peak RSS = each child's own ru_maxrss (os.wait4)."]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.results:
        Path(args.results).write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
