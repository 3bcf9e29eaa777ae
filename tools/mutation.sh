#!/usr/bin/env bash
# Mutation testing of the modules that guard users; writes docs/testing.md. Heavy (about half an hour on 2 cores):
#   flock /tmp/ganet-heavy.lock tools/mutation.sh [--module NAME] [--fresh] [--report]
set -euo pipefail
cd "$(dirname "$0")/.."
MUTMUT_VERSION=2.5.1  # mutmut 2 mutates files in place, which works with pyproject's package-dir mapping
                      # (mutmut 3 imports a copied source tree, which ganet.serve -> serve/ defeats); also the
                      # `mutation` extra in pyproject.toml
if [ "$(python3 -c 'import importlib.metadata as m; print(m.version("mutmut"))' 2>/dev/null)" != "$MUTMUT_VERSION" ]; then
    python3 -m pip install --quiet --disable-pip-version-check "mutmut==$MUTMUT_VERSION"
fi
exec python3 tools/mutation.py "$@"
