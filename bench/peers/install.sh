#!/usr/bin/env bash
# Install the fan-out benchmark peers from their own packages (nothing vendored).
# Idempotent: each step checks what is already there and skips it.
#   - nginx + nchan          Debian: nginx, libnginx-mod-nchan
#   - NATS server             Debian: nats-server (we run our own instance, see nats.conf)
#   - @y/websocket-server     npm, into bench/peers/node_modules (see package.json)
#   - websockets + uvloop     already in the project's .venv (bench/peers/ws_broadcast.py)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

need_apt=()
command -v nginx >/dev/null 2>&1 || need_apt+=(nginx)
ls /usr/lib/nginx/modules/ngx_nchan_module.so >/dev/null 2>&1 || need_apt+=(libnginx-mod-nchan)
command -v nats-server >/dev/null 2>&1 || need_apt+=(nats-server)
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
if ((${#need_apt[@]})); then
    echo "install.sh: apt-get install ${need_apt[*]}"
    # Update the package lists once, only when a package is missing from them.
    if ! apt-cache show "${need_apt[@]}" >/dev/null 2>&1; then
        apt-get update -qq
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
else
    echo "install.sh: nginx, nchan, nats-server, node already installed"
fi

if [[ ! -f "$here/node_modules/@y/websocket-server/package.json" ]]; then
    echo "install.sh: npm install (@y/websocket-server) into $here/node_modules"
    (cd "$here" && npm install --no-audit --no-fund --loglevel=error)
else
    echo "install.sh: @y/websocket-server already in $here/node_modules"
fi

if ! "$root/.venv/bin/python" -c "import websockets, uvloop" 2>/dev/null; then
    echo "install.sh: websockets/uvloop missing from $root/.venv: run 'make install' first" >&2
    exit 1
fi
echo "install.sh: versions:"
echo "  $(nginx -v 2>&1)"
echo "  nchan $(dpkg-query -W -f='${Version}' libnginx-mod-nchan 2>/dev/null || echo '?')"
echo "  $(nats-server --version)"
echo "  node $(node --version), @y/websocket-server $(node -p "require('$here/node_modules/@y/websocket-server/package.json').version")"
echo "  websockets $("$root/.venv/bin/python" -c 'import websockets; print(websockets.__version__)'), uvloop $("$root/.venv/bin/python" -c 'import uvloop; print(uvloop.__version__)')"
