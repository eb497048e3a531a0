#!/usr/bin/env bash
# Debian packages the tests and the benchmark use, and the OpenStack clients
# the client tests run (PyPI, in virtualenvs). Idempotent and quick when
# everything is already there.
set -euo pipefail
need=()
have() { command -v "$1" >/dev/null 2>&1; }
have mkfs.ext4 || need+=(e2fsprogs)
have mkfs.xfs || need+=(xfsprogs)
have xfs_repair || need+=(xfsprogs)
have losetup || need+=(mount)
have fuser || need+=(psmisc)
have curl || need+=(curl)
have fincore || need+=(util-linux)
[ -x /usr/bin/time ] || need+=(time)
have systemd-analyze || need+=(systemd)
have systemd-socket-activate || need+=(systemd)
# tests/systemd_nspawn.rs boots this machine's systemd in a container.
have systemd-nspawn || need+=(systemd-container)
# The OpenStack clients speak TCP; tests bridge 127.0.0.1 to the socket.
have socat || need+=(socat)
have python3 || need+=(python3)
if have python3 && ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    need+=(python3-venv)
fi
# Time zones for schedules (the calendar tests use Europe/Berlin).
[ -e /usr/share/zoneinfo/Europe/Berlin ] || need+=(tzdata)
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# The S3 server the backup tests and the benchmark start (moto, in server
# mode) and the AWS CLI the benchmark compares with, in a virtualenv of our
# own (.venv-s3 at the top of the tree; tests find it there).
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv-s3"
if ! "$venv/bin/python" -c 'import moto.server, flask_cors, boto3' >/dev/null 2>&1 \
    || [ ! -x "$venv/bin/aws" ]; then
    if ! python3 -m venv --help >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    fi
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check \
        'moto[s3]==5.2.5' flask flask-cors 'awscli>=1.40,<2'
fi

# The OpenStack clients the client tests run (tests/openstack_clients.rs).
"$(dirname "$0")/install-clients.sh"
