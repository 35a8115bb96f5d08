#!/usr/bin/env bash
# --- mixspec: header (generated) ---
# mixspec's own copy of train.sh (the swift target's launcher): `mixspec compile SPEC --target swift`
# writes train.sh from it, with this header (the Plan's components, and why a plugin where ms-swift's
# flags cannot say the Plan), the launcher environment, the model and the `swift sft` command filled in.
# --- end mixspec: header ---
# Data and output paths are used as the spec gives them, relative to the directory you run
# this script from. Extra arguments are passed on last, so they override: bash train.sh --max_steps 10
set -euo pipefail
# --- mixspec: env (generated) ---
# --- end mixspec: env ---

# --- mixspec: model_code_check (default) ---
# ms-swift loads a model with trust_remote_code=True and has no switch to turn that off. The spec
# does not allow the model's own code, so a model directory holding code (*.py files, "auto_map"
# in a JSON config) stops here, before swift starts. A hub id is downloaded by swift: not checked.
# --- mixspec: plan (generated) ---
MODEL=Qwen/Qwen2.5-VL-7B-Instruct
# --- end mixspec: plan ---
prev=""
for arg in "$@"; do
    if [[ "$prev" == "--model" ]]; then MODEL="$arg"; fi
    if [[ "$arg" == --model=* ]]; then MODEL="${arg#--model=}"; fi
    prev="$arg"
done
if [[ -d "$MODEL" ]]; then
    code="$(find "$MODEL" -name '*.py' -print 2>/dev/null; grep -l '"auto_map"' "$MODEL"/*.json 2>/dev/null || true)"
    if [[ -n "$code" ]]; then
        printf 'mixspec: the model directory %s holds code that ms-swift would run (it loads models with trust_remote_code=True):\n%s\n' "$MODEL" "$code" >&2
        printf 'The spec does not set trust_remote_code: true. Remove the code, or allow it in the spec and compile again.\n' >&2
        exit 1
    fi
fi
# --- end mixspec: model_code_check ---

# --- mixspec: command (generated) ---
swift sft \
    --model "$MODEL" \
    "$@"
# --- end mixspec: command ---
