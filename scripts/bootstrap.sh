#!/usr/bin/env bash
# Idempotent set-up of .venv/ at the repository root. Re-runs only when this
# script or pyproject.toml changed since the last successful run.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venv=.venv
stamp=$venv/.medmpc-installed
want=$(cat scripts/bootstrap.sh pyproject.toml | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
    exit 0
fi
echo "[bootstrap] setting up $venv (torch takes about 2 minutes the first time)" >&2
[[ -x $venv/bin/python ]] || python3.11 -m venv $venv 2>/dev/null || python3 -m venv $venv
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
# The CUDA build of torch 2.14.1 is what this pin resolves to; it runs on CPU too.
"${pip[@]}" install torch==2.14.1 torchvision==0.29.1
# crypten 0.4.1 lists the deprecated `sklearn` package: install it alone and
# let pyproject.toml name what it really imports.
"${pip[@]}" install --no-deps crypten==0.4.1
"${pip[@]}" install -e ".[test]"
echo "$want" > "$stamp"
echo "[bootstrap] done" >&2
