#!/usr/bin/env bash
# The OpenStack clients tests/openstack_clients.rs runs, from PyPI, each set
# in its own virtualenv (python-cinderclient 4.3 conflicts with 9.x):
#   $BLOCKSNAP_CLIENT_VENVS/current  tests/clients/requirements-current.txt
#   $BLOCKSNAP_CLIENT_VENVS/legacy   tests/clients/requirements-legacy.txt
# (default /var/tmp/blocksnap-clients, kept between runs). A virtualenv is
# rebuilt only when its requirements file or the Python changed.
set -euo pipefail
cd "$(dirname "$0")/.."
root="${BLOCKSNAP_CLIENT_VENVS:-/var/tmp/blocksnap-clients}"
mkdir -p "$root"
for name in current legacy; do
    req="tests/clients/requirements-$name.txt"
    venv="$root/$name"
    stamp="$(cat "$req" | sha256sum | cut -c1-16)-$(python3 -c 'import sys; print(sys.version.split()[0])')"
    if [ -f "$venv/.stamp" ] && [ "$(cat "$venv/.stamp")" = "$stamp" ]; then
        continue
    fi
    echo "installing the OpenStack clients of $req into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
    echo "$stamp" > "$venv/.stamp"
done
