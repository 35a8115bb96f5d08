#!/usr/bin/env bash
# Create the ms-swift test environment from scratch, in its own venv (never the project's).
#
#   bash scripts/swift_env.sh            # -> .venv-swift (or $MIXSPEC_SWIFT_VENV)
#   MIXSPEC_SWIFT_VENV=.venv-swift3 MIXSPEC_SWIFT_VERSION=3.12.6 bash scripts/swift_env.sh
#   MIXSPEC_SWIFT_VENV=.venv-swift pytest -m slow tests/e2e/test_swift_e2e.py
#
# torch and torchvision must be a matching pair: PyPI's torchvision is a CUDA build whose
# C extension does not load against a CPU torch ("operator torchvision::nms does not
# exist"), so take the CUDA pair that this machine's wheel mirror holds; it runs on CPU.
# An existing venv that already imports everything is kept (pass --fresh to rebuild).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MIXSPEC_SWIFT_VENV:-$ROOT/.venv-swift}"
PYTHON="${PYTHON:-python3}"

TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
# ms-swift 4.6.0 is the version the e2e tests were written against (MIXSPEC_SWIFT_VERSION
# picks another, e.g. 3.12.6 for --swift-version 3 output); qwen_vl_utils and decord are
# needed by swift's Qwen2.5-VL template but not pulled in by ms-swift; num2words by SmolVLM's processor.
SWIFT_PINS=("ms-swift==${MIXSPEC_SWIFT_VERSION:-4.6.0}" qwen_vl_utils decord num2words)

check() {
    WANT="${MIXSPEC_SWIFT_VERSION:-4.6.0}" "$VENV/bin/python" - <<'PY'
import os
import torch, torchvision, swift, peft, transformers, qwen_vl_utils, decord, num2words  # noqa: F401
from torchvision.ops import nms  # the C extension must load against this torch
import importlib.metadata as md
if md.version("ms-swift") != os.environ["WANT"]:
    raise SystemExit(f"ms-swift {md.version('ms-swift')} installed, {os.environ['WANT']} wanted")
print("swift venv:", "ms-swift", md.version("ms-swift"), "| torch", torch.__version__,
      "| torchvision", torchvision.__version__, "| transformers", transformers.__version__,
      "| peft", peft.__version__)
PY
}

if [[ "${1:-}" == "--fresh" ]]; then
    rm -rf "$VENV"
elif [[ -x "$VENV/bin/swift" ]] && check 2>/dev/null; then
    exit 0
fi

# pip warns about every package absent from the local wheel mirrors; keep errors, drop those
pip_install() {
    set +o pipefail
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
    local rc=${PIPESTATUS[0]}
    set -o pipefail
    return "$rc"
}

start=$SECONDS
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
pip_install "${TORCH_PINS[@]}" "${SWIFT_PINS[@]}"
check
echo "swift venv ready at $VENV in $((SECONDS - start)) s"
