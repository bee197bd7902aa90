"""The plain alternative to `medchat merge`, for bench/merge_memory.py: load the whole base,
attach the adapter with peft, merge_and_unload(), save_pretrained (what most tutorials do).

    python bench/peft_merge.py --base BASE_DIR --adapter ADAPTER_DIR --output OUT_DIR [--max-shard-size 2GB]
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--max-shard-size", default="2GB")
    args = ap.parse_args(argv)

    # imported here so that --help answers without loading them
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.base, dtype="auto")
    model = PeftModel.from_pretrained(model, args.adapter).merge_and_unload()
    model.save_pretrained(args.output, max_shard_size=args.max_shard_size)
    tok_src = args.adapter if any(Path(args.adapter).glob("tokenizer*")) else args.base
    AutoTokenizer.from_pretrained(tok_src).save_pretrained(args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
