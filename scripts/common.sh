# shellcheck shell=bash disable=SC2034
# Sourced by the test scripts (test.sh, test-aarch64.sh, reliability.sh, lsan-pytest.sh,
# docs.sh). Every step's line carries the time since the suite started (TQ_T0, set by the
# first script).
export TQ_T0=${TQ_T0:-$(date +%s)}
log() { local t=$(($(date +%s) - TQ_T0)); printf '\n==> [%d:%02d] %s\n' $((t / 60)) $((t % 60)) "$*"; }
# Sanitizer builds: -O1 (what the sanitizers' docs recommend) and line tables only, which
# compile in about 60% of RelWithDebInfo's -O2 -g time; reports still name file and line.
SAN_OPT=${TQ_SAN_OPT:--O1 -g1}
# The interpreter every step uses (and installs into): $PYTHON, else python3 on PATH.
PY=${PYTHON:-python3}
# What pip installs into that environment (cmake, ninja) comes first on PATH, also when
# $PYTHON names a virtual environment that is not activated.
_py_scripts=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
case ":$PATH:" in *":$_py_scripts:"*) ;; *) export PATH="$_py_scripts:$PATH" ;; esac

# pip_install ARGS...: pip install into $PY, quietly; fails when pip fails.
pip_install() {
  "$PY" -m pip install -q --disable-pip-version-check "$@" 2>&1 \
    | { grep -v -E "^WARNING: (Running pip as|Location)" || true; }
}

# pip_install_groups GROUP...: what pyproject.toml declares for each group ("build": the
# build requirements, "deps": the dependencies, else an extra), without the package itself.
# A step that builds or runs outside `pip install .` needs these in the environment it uses.
pip_install_groups() {
  local reqs=()
  mapfile -t reqs < <("$PY" scripts/requirements.py "$@")
  pip_install "${reqs[@]}"
}

# ensure_cmake: cmake >= 3.21 on PATH (the Debian one may be older): PyPI's when needed.
ensure_cmake() {
  cmake --version 2>/dev/null | awk 'NR==1{split($3,v,"."); exit !(v[1]>3 || (v[1]==3 && v[2]>=21))}' \
    || pip_install "cmake>=3.21"
}
