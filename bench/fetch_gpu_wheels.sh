#!/usr/bin/env bash
# Gather, on a connected machine, what bench/gpu_qlora.sh needs on a GPU machine that has
# torch/transformers/peft/accelerate but maybe no network, into bench/wheels/ (ignored by git;
# copy it to the GPU machine together with the checkout):
#   * wheels for CPython 3.12 on manylinux x86_64 (the GPU image's python3), pinned to the
#     versions installed here, i.e. the ones the tests ran with: bitsandbytes (slimmed to its
#     CUDA 12.8 / 13.0 / 13.2 binaries: 43 MB -> 13 MB), deepspeed's dependencies it lacks
#     (hjson, pydantic + core, annotated-types, typing-inspection, typing-extensions), datasets
#     (+ dill, multiprocess), openpyxl (+ et-xmlfile) for the spreadsheet, and transformers + peft
#     (+ regex, which transformers checks at import) so the GPU runs the tested versions;
#   * deepspeed's sdist (pure Python with DS_BUILD_OPS=0; gpu_qlora.sh builds it there, where
#     torch sees CUDA);
#   * the MedicationQA spreadsheet (../shared does not travel) and the 32000-token tokenizer.
#
#   . .venv/bin/activate && bash bench/fetch_gpu_wheels.sh [--python-version 3.12] [--cuda "128 130 132"]
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
PYVER=3.12
CUDA_KEEP="128 130 132"
DEST=${MEDCHAT_BENCH_KIT:-bench/wheels}
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PYVER=$2; shift 2 ;;
    --cuda) CUDA_KEEP=$2; shift 2 ;;
    *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done

ver() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
PKGS="bitsandbytes transformers regex peft datasets dill multiprocess openpyxl et-xmlfile hjson pydantic
      pydantic-core annotated-types typing-inspection typing-extensions"
pins=()
for p in $PKGS; do
  v=$(ver "$p") || { echo "$p is not installed in $PY's environment: activate the project's venv" >&2; exit 1; }
  pins+=("$p==$v")
done
ds="deepspeed==$(ver deepspeed)"

mkdir -p "$DEST"
rm -f "$DEST"/*.whl "$DEST"/*.tar.gz  # one version of each: two would stop the install there
platforms=()
for n in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 \
         manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${n}_x86_64")
done
echo "downloading for CPython $PYVER manylinux x86_64: ${pins[*]} $ds"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${platforms[@]}" -d "$DEST" "${pins[@]}"
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$DEST" "$ds"

# bitsandbytes ships one ~20 MB library per CUDA/ROCm version; keep the CUDA ones asked for.
"$PY" - "$DEST" "$CUDA_KEEP" <<'EOF'
import glob, re, sys, zipfile, os
dest, keep = sys.argv[1], set(sys.argv[2].split())
(src,) = glob.glob(f"{dest}/bitsandbytes-*.whl")
with zipfile.ZipFile(src) as zin:
    names = zin.namelist()
    drop = {n for n in names
            if (m := re.search(r"libbitsandbytes_(cuda|rocm|xpu)(\d+)\.so$", n))
            and not (m.group(1) == "cuda" and m.group(2) in keep)}
    tmp = src + ".tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            if info.filename in drop:
                continue
            data = zin.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):  # keep RECORD true to the contents
                data = "".join(line for line in data.decode().splitlines(True)
                               if line.split(",", 1)[0] not in drop).encode()
            zout.writestr(info, data)
os.replace(tmp, src)
print(f"bitsandbytes: kept CUDA {sorted(keep)}, dropped {len(drop)} libraries -> "
      f"{os.path.getsize(src) / 2**20:.1f} MiB")
EOF

sheet=../shared/data/MedInfo2019-QA-Medications.xlsx
[ -f "$sheet" ] || { echo "$sheet not found: the benchmark trains on it" >&2; exit 1; }
cp "$sheet" "$DEST/"
PYTHONPATH=. "$PY" bench/gpu_qlora.py tokenizer "$DEST/tokenizer-32k" >/dev/null

ls -la "$DEST"
kit=$(du -sb "$DEST" | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
# Kept small (checkout + kit under 60 MiB) so the copy is quick; some remote runners cap an
# upload at 64 MiB.
echo "bench/wheels: $((kit / 1048576)) MiB; tracked tree: $((tree / 1048576)) MiB; together they must stay under 60 MiB"
[ $((kit + tree)) -lt $((60 * 1048576)) ] || { echo "kit + checkout over 60 MiB: too large to copy quickly" >&2; exit 1; }
