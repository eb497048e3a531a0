#!/usr/bin/env bash
# Debian packages the tests and the benchmark use, and the OpenStack clients
# the client tests run (PyPI, in virtualenvs). Idempotent and quick when
# everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
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
# The OpenStack clients speak TCP; tests bridge 127.0.0.1 to the socket.
have socat || need+=(socat)
have python3 || need+=(python3)
if have python3 && ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    need+=(python3-venv)
fi
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
scripts/install-clients.sh
