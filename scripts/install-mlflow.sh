#!/usr/bin/env bash
# Install an MLflow tracking server (the `mlflow` package from PyPI, pinned) into a virtual
# environment, for the tests that log to a real server (crates/ferrospeed-cli/tests/mlflow.rs).
#
#   scripts/install-mlflow.sh [VENV_DIR]     # VENV_DIR defaults to <repo>/.mlflow-venv
#
# Prints the path of the `mlflow` command on success. Skips the install when the venv already has
# this version. `mlflow-skinny` is not enough: `mlflow server` needs the full package (Flask,
# SQLAlchemy, alembic for the sqlite store). About 2.5 minutes and 860 MB on a fresh 2-core machine.
set -euo pipefail

VERSION="3.17.2"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo_root/.mlflow-venv}"
mlflow="$venv/bin/mlflow"

if [[ -x "$mlflow" ]] && "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('mlflow') != '$VERSION')" 2>/dev/null; then
    echo "$mlflow"
    exit 0
fi

echo "installing mlflow==$VERSION into $venv ..." >&2
python3 -m venv "$venv" >&2
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "mlflow==$VERSION" >&2
"$mlflow" --version >&2
echo "$mlflow"
