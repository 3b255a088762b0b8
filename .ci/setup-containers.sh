#!/usr/bin/env bash
# Prepare this machine for the containers test tier (tests/containers, deploy/compose.yaml):
# rootful podman from Debian with the fixes of shared/CONTAINERS-NOTES.md, podman-compose, and a
# registry-free base image built with debootstrap. Idempotent: a second run only checks (~1 s).
#
# Usage: bash .ci/setup-containers.sh [PROJECT_VENV]
#   PROJECT_VENV  its python creates the podman-compose venv (default: python3 on PATH).
# podman-compose goes into its own venv (/opt/podman-compose, linked as /usr/local/bin/podman-compose)
# so that its PyYAML never hides a missing dependency of the project's own tests.
set -euo pipefail

BASE_IMAGE=localhost/quicmesh-base:bookworm
COMPOSE_VENV=/opt/podman-compose
PACKAGES=(podman runc netavark aardvark-dns iptables debootstrap catatonit)

if [ "$(id -u)" -ne 0 ]; then
    echo "setup-containers: skipped: needs root (rootful podman); the containers tests will skip too"
    exit 0
fi

t_start=$SECONDS
step() { echo "setup-containers: $*"; }
die() { echo "setup-containers: ERROR: $*" >&2; exit 1; }
elapsed() { echo "$((SECONDS - $1))s"; }

# 1. Debian packages (systemd only for `systemd-analyze verify`; it installs fine without booting it).
t=$SECONDS
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed' || missing+=("$p")
done
command -v systemd-analyze >/dev/null || missing+=(systemd)
if [ ${#missing[@]} -gt 0 ]; then
    step "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || die "apt-get install ${missing[*]} failed"
fi
step "packages ok ($(elapsed $t))"

# 2. containers.conf: rlimits root may set here, runc (crun 1.8 rejects this hybrid cgroup layout), and
#    netavark pinned (Debian's podman also ships a CNI config that would otherwise be considered).
hard_nofile=$(ulimit -Hn)
[ "$hard_nofile" = unlimited ] && hard_nofile=1048576
conf=$(cat <<CONF
# Written by quicmesh .ci/setup-containers.sh (see shared/CONTAINERS-NOTES.md).
[containers]
default_ulimits = ["nofile=${hard_nofile}:${hard_nofile}", "nproc=32768:32768"]

[engine]
runtime = "runc"

[network]
network_backend = "netavark"
CONF
)
if [ "$(cat /etc/containers/containers.conf 2>/dev/null)" != "$conf" ]; then
    mkdir -p /etc/containers
    printf '%s\n' "$conf" > /etc/containers/containers.conf
    step "wrote /etc/containers/containers.conf (nofile=$hard_nofile, runtime=runc)"
fi

# 3. podman-compose (podman 4.3 has no `podman compose`).
t=$SECONDS
if ! "$COMPOSE_VENV/bin/podman-compose" --version >/dev/null 2>&1; then
    python=python3
    [ -n "${1:-}" ] && python="$1/bin/python"
    "$python" -m venv "$COMPOSE_VENV" || die "cannot create $COMPOSE_VENV with $python"
    "$COMPOSE_VENV/bin/pip" install -q 'podman-compose>=1.6,<1.7' || die "pip install podman-compose failed"
fi
ln -sf "$COMPOSE_VENV/bin/podman-compose" /usr/local/bin/podman-compose
step "podman-compose $("$COMPOSE_VENV/bin/podman-compose" --version 2>/dev/null | grep -io 'podman-compose version.*' | head -1 | awk '{print $3}') ok ($(elapsed $t))"

# 4. Base image: no registry here, so debootstrap Debian's own packages (podman's store persists).
t=$SECONDS
if ! podman image exists "$BASE_IMAGE"; then
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    root=$(mktemp -d /var/tmp/quicmesh-base.XXXXXX)
    trap 'rm -rf "$root"' EXIT
    step "debootstrap bookworm from $mirror (~40 s)"
    debootstrap --variant=minbase \
        --include=python3,python3-venv,iproute2,iptables,ca-certificates \
        bookworm "$root" "$mirror" > /var/tmp/quicmesh-debootstrap.log 2>&1 \
        || die "debootstrap failed, see /var/tmp/quicmesh-debootstrap.log"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | podman import -q - "$BASE_IMAGE" >/dev/null || die "podman import failed"
    rm -rf "$root"
    trap - EXIT
fi
step "base image $BASE_IMAGE ok ($(elapsed $t))"

# 5. Smoke test: a container actually starts (catches runtime/rlimit/cgroup problems with a clear error).
t=$SECONDS
out=$(podman run --rm --init --network none "$BASE_IMAGE" python3 -c 'import venv, sys; print(sys.version.split()[0])' 2>&1) \
    || die "podman run failed: $out"
step "podman run ok, python $out in the image ($(elapsed $t))"
step "done in $(elapsed $t_start)"
