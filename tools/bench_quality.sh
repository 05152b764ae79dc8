#!/usr/bin/env bash
# Quality, fit time and test throughput of PatchCore and PaDiM on every category of ../shared/data,
# each through tools/bench.py (adx CLI: fit, then test --ckpt). Writes docs/bench/<model>_<category>.json.
# Run from the repository root on an otherwise idle machine: bash tools/bench_quality.sh
set -euo pipefail
DATA=${ADX_SHARED_DATA:-../shared/data}
run() {  # model dataset category image_size [key=value ...]
    local model=$1 dataset=$2 category=$3 size=$4
    shift 4
    local sets=()
    for kv in "$@"; do sets+=(--set "$kv"); done
    python tools/bench.py "$model" "$DATA/$dataset" "$category" --image-size "$size" "${sets[@]}" \
        --out "docs/bench/${model,,}_${category}.json"
}
run PatchCore mvtec_ad screw 320
run PatchCore magnetic_tile magnetic_tile 320 model.coreset_ratio=0.01
run PatchCore mvtec_loco juice_bottle 320
run Padim mvtec_ad screw 256
run Padim magnetic_tile magnetic_tile 256
run Padim mvtec_loco juice_bottle 256
