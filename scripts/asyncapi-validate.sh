#!/usr/bin/env bash
# Validate the AMQP contract, docs/asyncapi.yaml, with the AsyncAPI CLI.
#
# Installs @asyncapi/cli from npm into tools/contract/node_modules (the
# version pinned by tools/contract/package.json and package-lock.json) and
# runs `asyncapi validate`, which also resolves the payload schemas it refers
# to in docs/schemas/. Any error or warning fails. That every queue and
# exchange name of the topology appears in the document, and that
# docs/schemas/ is what the code generates, are checked by `make test`
# (topology::names and schemas tests).
#
# Needs Node.js and npm; installs Debian's nodejs and npm packages if missing.
# Prints "contract: N passed, M failed" last; exits non-zero on any failure.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

SUDO=()
[ "$(id -u)" = 0 ] || SUDO=(sudo)

die() {
    echo "asyncapi-validate: $*" >&2
    echo "contract: 0 passed, 1 failed"
    exit 1
}

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "asyncapi-validate: installing Debian's nodejs and npm"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nodejs npm >/dev/null ||
        die "could not install nodejs and npm"
fi

CLI=tools/contract/node_modules/.bin/asyncapi
if [ ! -x "$CLI" ] || [ tools/contract/package-lock.json -nt tools/contract/node_modules/.package-lock.json ]; then
    echo "asyncapi-validate: npm ci in tools/contract"
    (cd tools/contract && npm ci --silent --no-audit --no-fund >/dev/null) || die "npm ci failed in tools/contract"
fi

# No usage reporting (it would try the network) and no file in $HOME.
STATE="$(mktemp -d)"
trap 'rm -rf "$STATE"' EXIT
echo '{"analyticsEnabled":"false","infoMessageShown":"true","userID":"ci"}' >"$STATE/analytics.json"
export ASYNCAPI_METRICS_CONFIG_PATH="$STATE/analytics.json"
export SUPPRESS_NO_CONFIG_WARNING=1

echo "asyncapi-validate: $("$CLI" --version 2>/dev/null | head -1)"
if "$CLI" validate docs/asyncapi.yaml --fail-severity=warn; then
    echo "contract: 1 passed, 0 failed"
else
    die "docs/asyncapi.yaml is not a valid AsyncAPI document (see above)"
fi
