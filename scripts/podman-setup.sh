#!/usr/bin/env bash
# Prepare this machine for the container tests: podman (Docker Engine API compatible), a local
# Debian base image and a Redis image. No container registry is reachable from CI, so both
# images are built locally. Idempotent: a second run only checks and prints.
# Run as root on Debian 12 (CI does); every step is below.
set -euo pipefail

BASE_IMAGE=localhost/debian-py:bookworm
REDIS_IMAGE=localhost/redis-test:7
PACKAGES=(podman runc debootstrap)

log() { printf '[podman-setup] %s\n' "$*"; }
die() { printf '[podman-setup] ERROR: %s\n' "$*" >&2; exit 1; }
trap 'die "command failed (line $LINENO): $BASH_COMMAND"' ERR

[[ $(id -u) -eq 0 ]] || die "must run as root (apt-get, /etc/containers, podman storage)"

# Serialize concurrent runs (parallel test sessions on one machine): apt and image builds.
mkdir -p /run/lock
exec 9>/run/lock/backupd-podman-setup.lock
flock -w 900 9 || die "another podman-setup.sh still holds /run/lock/backupd-podman-setup.lock"

# --- packages ----------------------------------------------------------------------------------
missing=()
for p in "${PACKAGES[@]}"; do
    [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == *"ok installed" ]] || missing+=("$p")
done
if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    # apt-get update only when the package lists cannot serve the install (fresh machine).
    policy=$(apt-cache policy "${missing[@]}" 2>/dev/null || true)
    if [[ -z $policy || $policy == *"Candidate: (none)"* ]] \
        || ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
        log "apt-get update"
        apt-get update -qq || die "apt-get update failed"
    fi
    log "installing ${missing[*]}"
    if ! apt-get install -y -qq "${missing[@]}" >/dev/null; then
        # Stale lists give 404s on a machine that was not updated for a while: retry once.
        log "install failed; apt-get update and retry"
        apt-get update -qq || die "apt-get update failed"
        apt-get install -y -qq "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
    fi
else
    log "packages present: ${PACKAGES[*]}"
fi

# --- podman configuration ----------------------------------------------------------------------
# crun fails here (cgroups hybrid mode), raising rlimits is not permitted, and there is no bridge
# network: use runc, fixed ulimits and the host network namespace.
conf=$(cat <<'EOF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
netns = "host"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
EOF
)
mkdir -p /etc/containers
if [[ -f /etc/containers/containers.conf && $(cat /etc/containers/containers.conf) == "$conf" ]]; then
    log "containers.conf up to date"
else
    printf '%s\n' "$conf" >/etc/containers/containers.conf
    log "wrote /etc/containers/containers.conf"
fi
podman info >/dev/null 2>&1 || die "podman does not work: see 'podman info'"

# --- base image (debootstrap; ~40 s) -----------------------------------------------------------
if podman image exists "$BASE_IMAGE"; then
    log "image $BASE_IMAGE present"
else
    mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    if [[ -z $mirror ]]; then
        mirror=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    fi
    mirror=${mirror:-http://deb.debian.org/debian}
    rootfs=$(mktemp -d /var/tmp/debian-py-rootfs.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    log "building $BASE_IMAGE with debootstrap from $mirror"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
        || { tail -n 20 "$rootfs.log" >&2; die "debootstrap failed (log: $rootfs.log)"; }
    rm -f "$rootfs.log"
    # Use deb822 sources in sources.list.d, as the official python/debian images do, so a build
    # that mounts the host's sources.list.d replaces them instead of duplicating them.
    rm -f "$rootfs/etc/apt/sources.list"
    if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
        cp /etc/apt/sources.list.d/debian.sources "$rootfs/etc/apt/sources.list.d/"
    else
        printf '%s\n' 'Types: deb' "URIs: $mirror" 'Suites: bookworm bookworm-updates' \
            'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' \
            >"$rootfs/etc/apt/sources.list.d/debian.sources"
    fi
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import -q - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
    log "built $BASE_IMAGE"
fi

# --- redis image -------------------------------------------------------------------------------
# Like the official redis image where backupd cares: uid/gid 999, data dir /data (the default
# `dir` is the working directory), umask 0077 (dump.rdb mode 0600, as the official entrypoint
# sets it), and `command` gives redis-server's arguments.
recipe=$(cat <<EOF
FROM $BASE_IMAGE
RUN groupadd --system --gid 999 redis \\
 && useradd --system --uid 999 --gid 999 --home-dir /data --no-create-home redis \\
 && apt-get update -qq \\
 && apt-get install -y -qq --no-install-recommends redis-server \\
 && rm -rf /var/lib/apt/lists/* \\
 && install -d -o redis -g redis -m 0755 /data
WORKDIR /data
USER redis
ENTRYPOINT ["/bin/sh", "-c", "umask 0077 && exec redis-server \"\$@\"", "redis-server"]
EOF
)
# The recipe's hash is a label, so an edited recipe rebuilds the image on the next run.
recipe_id=$(printf '%s' "$recipe" | sha256sum | cut -c1-16)
have_id=$(podman image inspect --format '{{index .Labels "backupd.recipe"}}' "$REDIS_IMAGE" 2>/dev/null || true)
if [[ $have_id == "$recipe_id" ]]; then
    log "image $REDIS_IMAGE present"
else
    ctx=$(mktemp -d)
    trap 'rm -rf "$ctx"' EXIT
    printf '%s\nLABEL backupd.recipe=%s\n' "$recipe" "$recipe_id" >"$ctx/Containerfile"
    log "building $REDIS_IMAGE"
    # Same read-only mounts as the backupd build: apt inside reaches the mirrors this host uses.
    podman build -q --network=host \
        -v /etc/ssl/certs:/etc/ssl/certs:ro \
        -v /etc/apt/sources.list.d:/etc/apt/sources.list.d:ro \
        -t "$REDIS_IMAGE" "$ctx" >/dev/null || die "building $REDIS_IMAGE failed"
    rm -rf "$ctx"
    log "built $REDIS_IMAGE ($(podman run --rm "$REDIS_IMAGE" --version | awk '{print $3}'))"
fi
log "done"
