# Sourced by the other scripts: defines `uvx_` to run uv, installing it from PyPI once
# if this machine has none (into the user's site-packages; uv then manages .venv).
uvx_() {
  if command -v uv >/dev/null 2>&1; then
    uv "$@"
    return
  fi
  if ! python3 -m uv --version >/dev/null 2>&1; then
    echo "installing uv (the project's package manager) from PyPI..." >&2
    python3 -m pip install --user --quiet uv 2>/dev/null \
      || python3 -m pip install --user --quiet --break-system-packages uv
  fi
  python3 -m uv "$@"
}
