#!/usr/bin/env bash
# Idempotent set-up of .venv/ at the repository root. Re-runs only when this
# script, pyproject.toml or the set of package modules changed since the last
# successful run (or scripts/constraints.txt, the versions it installs): the strict editable install links each module file, so a new
# module needs a new install.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venv=.venv
stamp=$venv/.medmpc-installed
want=$({ cat scripts/bootstrap.sh scripts/constraints.txt pyproject.toml; git ls-files --cached --others --exclude-standard \
    mpc models imaging training protocols serving cli netlab 2>/dev/null || find mpc models imaging training protocols serving cli netlab -name '*.py'; } \
    | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
    exit 0
fi
echo "[bootstrap] setting up $venv (torch takes about 2 minutes the first time)" >&2
# the separate-hosts harness (netlab) needs iproute2 (ip, tc); the walk-through uses openssl; the
# clinic page's tests drive Debian's chromium (browser downloads are not reachable everywhere)
if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    missing=()
    command -v tc >/dev/null || missing+=(iproute2)
    command -v openssl >/dev/null || missing+=(openssl)
    command -v chromium >/dev/null || missing+=(chromium)
    command -v chromedriver >/dev/null || missing+=(chromium-driver)
    if ((${#missing[@]})); then
        echo "[bootstrap] apt-get install ${missing[*]}" >&2
        # not fatal: the tests that need these skip, saying why, where they are missing
        if ! { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null; }; then
            echo "[bootstrap] could not install ${missing[*]}; the tests that need them will skip" >&2
        fi
    fi
fi
[[ -x $venv/bin/python ]] || python3.11 -m venv $venv 2>/dev/null || python3 -m venv $venv
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
pin=(-c scripts/constraints.txt)
# The CUDA build of torch 2.14.1 is what this pin resolves to; it runs on CPU too.
"${pip[@]}" install "${pin[@]}" torch==2.14.1 torchvision==0.29.1
# crypten 0.4.1 lists the deprecated `sklearn` package: install it alone and
# let pyproject.toml name what it really imports.
"${pip[@]}" install "${pin[@]}" --no-deps crypten==0.4.1
# Strict editable mode: site-packages sees a tree of links named medmpc/..., so
# only `medmpc` is importable (never `mpc` or `cli`), and type checkers follow it.
"${pip[@]}" install "${pin[@]}" -e ".[test]" --config-settings editable_mode=strict
echo "$want" > "$stamp"
echo "[bootstrap] done" >&2
