#!/usr/bin/env bash
# Create the axolotl test environment, in its own venv (never the project's).
#
#   bash scripts/axolotl_env.sh          # -> .venv-axolotl (or $MIXSPEC_AXOLOTL_VENV)
#   pytest -m slow tests/e2e/test_axolotl_e2e.py
#
# axolotl 0.19.0 is installed with --no-deps: its full dependency set pulls triton, xformers
# (a CUDA torch), bitsandbytes, gradio, modal, lm_eval, cloud file systems and more. What it
# gets instead is only what `axolotl.cli.config.load_cfg` (what `axolotl train`/`preprocess`
# run first: validate_config, normalize_config, the datasets' normalization) imports, found by
# trying, at axolotl's own pins, plus what its model loader (axolotl.loaders.ModelLoader: the
# model, then PEFT) imports: ~2.9 GB, under 2 minutes here. Not installed: torchvision (PyPI's
# build does not load against the CPU torch 2.13.0 and none matching is on this disk), so
# axolotl cannot load a VLM's processor here; xformers, liger, flash-attn, gradio, modal, lm_eval.
# An existing venv that already imports everything is kept (pass --fresh to rebuild).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MIXSPEC_AXOLOTL_VENV:-$ROOT/.venv-axolotl}"
PYTHON="${PYTHON:-python3}"

# torch: the CPU build on this disk (axolotl 0.19 wants torch<=2.13.0)
TORCH_PINS=(torch==2.13.0)
AXOLOTL_PIN=axolotl==0.19.0
# axolotl 0.19.0's own pins for what its config path imports; the rest unpinned as it has them
DEPS=(transformers==5.16.1 peft==0.20.0 accelerate==1.13.0 datasets==4.8.4 trl==1.9.0
      pydantic==2.12.5 PyYAML==6.0.3 huggingface_hub==1.17.0 tokenizers==0.23.1 packaging==26.0
      typing-extensions==4.15.0 posthog==6.7.11 "numba>=0.63.1,<1.0" "deepspeed>=0.18.6,<0.19.0"
      addict fire requests einops colorama pillow
      # the model loader's imports
      axolotl-contribs-lgpl==0.0.7 bitsandbytes==0.50.2 "triton>=3.4.0" "kernels>=0.16.0,<0.17.0"
      evaluate==0.4.1 fastcore wandb)

check() {
    AXOLOTL_DO_NOT_TRACK=1 "$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import axolotl.cli.config  # noqa: F401  (load_cfg and everything it imports)
import axolotl.loaders  # noqa: F401  (ModelLoader)
if md.version("axolotl") != "0.19.0":
    raise SystemExit(f"axolotl {md.version('axolotl')} installed, 0.19.0 wanted")
print("axolotl venv:", "axolotl", md.version("axolotl"), "| torch", md.version("torch"),
      "| transformers", md.version("transformers"), "| peft", md.version("peft"))
PY
}

if [[ "${1:-}" == "--fresh" ]]; then
    rm -rf "$VENV"
elif [[ -x "$VENV/bin/python" ]] && check 2>/dev/null; then
    exit 0
fi

# pip warns about every package absent from the local wheel mirrors, and (--no-deps) about
# axolotl's requirements left out on purpose; keep errors, drop those
pip_install() {
    set +o pipefail
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 \
        | { grep -v -E "is ignored: it is neither a file nor a directory|^axolotl .* requires |dependency resolver|dependency conflicts" || true; }
    local rc=${PIPESTATUS[0]}
    set -o pipefail
    return "$rc"
}

start=$SECONDS
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
pip_install "${TORCH_PINS[@]}"
pip_install --no-deps "$AXOLOTL_PIN"
pip_install "${TORCH_PINS[@]}" "${DEPS[@]}"
check
echo "axolotl venv ready at $VENV in $((SECONDS - start)) s"
