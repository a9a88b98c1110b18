# shellcheck shell=bash
# Sourced by scripts/test, scripts/run and scripts/bench: make .venv and install the project into it.
# Usage: . scripts/bootstrap.sh EXTRAS [DEBIAN_PACKAGE...]
#   EXTRAS            pip extras to install with the project, e.g. "dev" or "dev,bench"
#   DEBIAN_PACKAGE    commands the caller needs; installed with apt-get when missing and running as root
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

relay_extras=${1:-}
shift || true

missing=()
for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        echo "bootstrap: installing Debian packages: ${missing[*]}" >&2
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "bootstrap: missing Debian packages (${missing[*]}); tests that need them will be skipped" >&2
    fi
fi

python=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    echo "bootstrap: creating .venv with $($python --version)" >&2
    "$python" -m venv .venv
fi
# Reinstall only when the project's metadata changed since the last install.
stamp=.venv/.relay-installed-${relay_extras//,/-}
if [[ -z $relay_extras ]]; then # any earlier install (with extras) includes the project itself
    for earlier in .venv/.relay-installed-*; do
        if [[ -f $earlier && ! pyproject.toml -nt $earlier ]]; then stamp=$earlier; fi
    done
fi
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >&2
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".${relay_extras:+[$relay_extras]}" >&2
    touch "$stamp"
fi
