#!/usr/bin/env bash
# One-command set-up: a virtual environment in .venv with a torch/torchaudio pair that
# imports on a CPU-only machine and on a CUDA machine, then higgs-tune with its test extras.
# Idempotent: a second run checks what is there and returns in seconds.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
# torchaudio is needed only for `torchaudio.functional.resample` (pure Python) inside
# HiggsAudioV2TokenizerModel; 2.11.0 installs beside torch 2.14.1 with --no-deps.
TORCHAUDIO_SPEC=${TORCHAUDIO_SPEC:-torchaudio==2.11.0}

die() { echo "setup.sh: error: $*" >&2; exit 1; }

command -v "$PY" >/dev/null || die "'$PY' not found. Install Python 3.10-3.12 or set PYTHON=/path/to/python3."
"$PY" -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 12) else 1)' \
  || die "Python 3.10-3.12 is required, found $("$PY" --version 2>&1)."
"$PY" -c 'import venv, ensurepip' 2>/dev/null || die "the Python venv module is missing (Debian: apt-get install python3-venv)."

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup.sh: creating $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
STAMP="$VENV/.higgs-tune-setup"
HASH=$(cat pyproject.toml setup.sh | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ] \
   && "$VPY" -c 'import torch, torchaudio, transformers, higgs_tune' 2>/dev/null; then
  echo "setup.sh: $VENV is up to date ($("$VPY" -c 'import torch; print("torch", torch.__version__)'))."
  exit 0
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1
"$VPY" -m pip install --quiet --upgrade pip setuptools wheel || die "pip could not upgrade itself (is a package registry reachable?)."
if ! "$VPY" -c 'import torch' 2>/dev/null; then
  echo "setup.sh: installing $TORCH_SPEC (this is the slow step)"
  "$VPY" -m pip install --quiet "$TORCH_SPEC" || die "could not install $TORCH_SPEC."
fi
if ! "$VPY" -c 'import torchaudio.functional' 2>/dev/null; then
  echo "setup.sh: installing $TORCHAUDIO_SPEC --no-deps"
  "$VPY" -m pip install --quiet --no-deps "$TORCHAUDIO_SPEC" || die "could not install $TORCHAUDIO_SPEC."
fi
echo "setup.sh: installing higgs-tune with its test extras"
"$VPY" -m pip install --quiet -e ".[test]" || die "could not install higgs-tune (see the pip output above)."
"$VPY" -c 'import torch, torchaudio.functional, transformers
from transformers import HiggsAudioV2ForConditionalGeneration, HiggsAudioV2TokenizerModel, HiggsAudioV2Processor
import higgs_tune' || die "the environment was installed but does not import; see the error above."
echo "$HASH" > "$STAMP"
echo "setup.sh: done. Activate with: source $VENV/bin/activate"
