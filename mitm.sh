#!/usr/bin/env bash
# Portcullis entry point: creates .venv on first use, then runs the CLI.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
venv="${PORTCULLIS_VENV:-$here/.venv}"

find_python() {
  local c
  for c in ${PORTCULLIS_PYTHON:-} python3 python3.13 python3.12 python3.11 python; do
    # pyenv shims exist for versions that are not active: the version check below skips them
    if command -v "$c" >/dev/null 2>&1 &&
       "$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      echo "$c"; return 0
    fi
  done
  return 1
}

ensure_venv() {
  if [ ! -x "$venv/bin/python" ]; then
    local py
    py="$(find_python)" || { echo "mitm.sh: need Python >= 3.11 (set PORTCULLIS_PYTHON)" >&2; exit 2; }
    echo "mitm.sh: creating $(basename "$venv") with $("$py" --version 2>&1)" >&2
    "$py" -m venv "$venv"
  fi
  # Reinstall when pyproject.toml changed since the last install.
  if [ ! -f "$venv/.installed" ] || [ pyproject.toml -nt "$venv/.installed" ]; then
    echo "mitm.sh: installing Portcullis and its dependencies into .venv" >&2
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >&2 || true
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]" >&2
    touch "$venv/.installed"
  fi
}

ensure_venv
cmd="${1:-help}"
case "$cmd" in
  test)
    shift
    exec "$venv/bin/python" -m pytest "$@"
    ;;
  *)
    exec "$venv/bin/python" -m addons.cli "$@"
    ;;
esac
