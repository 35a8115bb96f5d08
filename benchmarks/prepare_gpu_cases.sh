#!/usr/bin/env bash
# Prepare the inputs of benchmarks/gpu_memory_check.py: one folder per spec with the
# Plan (mixspec plan --json) and the model's config.json. Runs here (no GPU needed);
# the folders then travel to the GPU machine.
set -euo pipefail
out=${1:-.gpu_in}
for spec in benchmarks/gpu_specs/*.yaml; do
  name=$(basename "$spec" .yaml)
  mkdir -p "$out/$name"
  mixspec plan "$spec" --json > "$out/$name/plan.json"
  model=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['model']['ref'])" "$out/$name/plan.json")
  cp "compiler/models/catalog/$model/config.json" "$out/$name/config.json"
done
