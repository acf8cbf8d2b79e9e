#!/usr/bin/env bash
# Builds the documentation site (mkdocs.yml, docs/) into build/docs with `mkdocs build
# --strict`: a broken link, a page missing from the nav or a docstring the API reference
# cannot render fails the build. The API reference is read from the sources (griffe), so
# the compiled extension is not needed: installs the `docs` extra's requirements only.
# Called by scripts/test.sh; runs alone too (TQ_DOCS_DIR sets the output folder).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh  # log, PY, pip_install_groups

# (mkdocs-material's notice about its successor is not a build problem.)
export NO_MKDOCS_2_WARNING=1
log "documentation: mkdocs build --strict"
pip_install_groups docs
"$PY" -m mkdocs build --strict --site-dir "${TQ_DOCS_DIR:-build/docs}"
