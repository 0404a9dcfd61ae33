#!/usr/bin/env bash
# tools/local-docker.sh: a private Docker engine for npyloader's container tests, on a machine
# that has no Docker daemon and reaches no image registry (only Debian's packages and PyPI).
#
#   tools/local-docker.sh up     as root: apt-get install docker.io docker-compose debootstrap if
#                                missing (and, best effort, prometheus for the monitoring tests); start dockerd (vfs storage, no iptables, no default
#                                bridge) on its own socket under /tmp/npyloader-docker unless it is
#                                already running; wait until it answers; build the base image
#                                npyloader-base:bookworm with debootstrap (rootfs cached) if missing.
#   tools/local-docker.sh down   stop the dockerd that `up` started; keep its images and caches.
#   tools/local-docker.sh env    print the line that points the docker tools at that engine:
#                                eval "$(tools/local-docker.sh env)"
#
# Idempotent: running `up` again with everything in place takes about a second. Verbose output
# of apt, debootstrap and dockerd goes to log files under /tmp/npyloader-docker; progress goes to
# stdout. When something cannot be done, `up` exits 1 with one line on stderr that says why
# (make test shows that line and skips the docker tests).
#
# Settings (environment): NPYLOADER_DOCKERD_TIMEOUT seconds to wait for dockerd (default 60),
# NPYLOADER_DEBIAN_MIRROR for debootstrap (default http://deb.debian.org/debian).
set -euo pipefail

STATE=/tmp/npyloader-docker
SOCK="$STATE/docker.sock"
PIDFILE="$STATE/dockerd.pid"
DOCKERD_LOG="$STATE/dockerd.log"
APT_LOG="$STATE/apt.log"
DEBOOTSTRAP_LOG="$STATE/debootstrap.log"
ROOTFS="$STATE/rootfs"
BASE_IMAGE="npyloader-base:bookworm"
SUITE=bookworm
MIRROR="${NPYLOADER_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DOCKERD_TIMEOUT="${NPYLOADER_DOCKERD_TIMEOUT:-60}"
HOST_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
export DOCKER_HOST="unix://$SOCK"

say() { echo "local-docker: $*"; }
die() { echo "local-docker: error: $*" >&2; exit 1; }
elapsed() { echo "$(( $(date +%s) - $1 ))s"; }
last_line() { { grep -v '^[[:space:]]*$' "$1" 2>/dev/null || true; } | tail -n 1 | cut -c1-300; }

usage() {
    echo "usage: $0 up|down|env" >&2
    exit 2
}

dockerd_pid() {
    # The pid from the pidfile, printed only while that process is still a dockerd.
    local pid
    [ -r "$PIDFILE" ] || return 1
    pid="$(cat "$PIDFILE" 2>/dev/null || true)"
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dockerd ] || return 1
    echo "$pid"
}

engine_answers() { docker info >/dev/null 2>&1; }

alive() {
    # True while the process exists and is not a zombie.
    local state
    state="$(sed -e 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}

install_packages() {
    local missing=() t t2
    command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
    command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
    command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
    # Not Docker's, but installed here too: the network-fault tests (loader_server/tools/netlab) drop
    # packets with iptables inside their own namespaces.
    command -v iptables >/dev/null 2>&1 || missing+=(iptables)
    [ "${#missing[@]}" -eq 0 ] && return 0
    command -v apt-get >/dev/null 2>&1 \
        || die "cannot install ${missing[*]}: no apt-get on this machine (install them by hand)"
    t=$(date +%s)
    say "installing ${missing[*]} with apt-get (log: $APT_LOG)"
    export DEBIAN_FRONTEND=noninteractive
    # An empty or stale package list cannot offer docker.io: refresh it first in that case.
    if ! grep -q 'Candidate: [0-9]' <<<"$(apt-cache policy docker.io 2>/dev/null || true)"; then
        say "apt-get update"
        apt-get update >>"$APT_LOG" 2>&1 || true
    fi
    if ! apt-get install -y --no-install-recommends "${missing[@]}" >>"$APT_LOG" 2>&1; then
        say "apt-get install failed; retrying after apt-get update"
        apt-get update >>"$APT_LOG" 2>&1 || true
        apt-get install -y --no-install-recommends "${missing[@]}" >>"$APT_LOG" 2>&1 \
            || die "apt-get install ${missing[*]} failed: $(last_line "$APT_LOG") (full log: $APT_LOG)"
    fi
    for t2 in dockerd docker-compose debootstrap iptables; do
        command -v "$t2" >/dev/null 2>&1 || die "apt-get installed ${missing[*]} but $t2 is still missing"
    done
    say "installed ${missing[*]} in $(elapsed "$t")"
}

install_prometheus() {
    # Debian's prometheus package, whose server and promtool let tests/deploy/test_monitoring.py check
    # the compose monitoring profile for real. Best effort: without it those tests are skipped,
    # saying why. Its service is not started (policy-rc.d), on this machine or any other.
    local policy=/usr/sbin/policy-rc.d made=""
    command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 && return 0
    command -v apt-get >/dev/null 2>&1 || { say "no apt-get: not installing prometheus"; return 0; }
    mkdir -p "$STATE"
    say "installing prometheus with apt-get, for tests/deploy/test_monitoring.py (log: $APT_LOG)"
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made=1
    fi
    if DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus >>"$APT_LOG" 2>&1 \
        || { apt-get update >>"$APT_LOG" 2>&1;
             DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus >>"$APT_LOG" 2>&1; }; then
        say "installed prometheus"
    else
        say "could not install prometheus ($(last_line "$APT_LOG")); tests that run it will be skipped"
    fi
    [ -z "$made" ] || rm -f "$policy"
}

start_dockerd() {
    local pid t deadline
    if pid="$(dockerd_pid)"; then
        if engine_answers; then
            say "dockerd already running (pid $pid)"
            return 0
        fi
        say "dockerd (pid $pid) is running but not answering yet"
    else
        if [ -S "$SOCK" ] && engine_answers; then
            die "an engine not started by this script already answers on $SOCK (no dockerd pidfile $PIDFILE)"
        fi
        rm -f "$PIDFILE"
        t=$(date +%s)
        say "starting dockerd (log: $DOCKERD_LOG)"
        # setsid + all three streams redirected: the daemon outlives this script and never holds
        # a caller's pipe open (pytest and make capture this script's output), nor our lock (fd 9).
        setsid dockerd --storage-driver vfs --iptables=false --bridge=none \
            --host "unix://$SOCK" --data-root "$STATE/root" --exec-root "$STATE/exec" \
            --pidfile "$PIDFILE" </dev/null >>"$DOCKERD_LOG" 2>&1 9>&- &
        pid=$!
    fi
    deadline=$(( $(date +%s) + DOCKERD_TIMEOUT ))
    until engine_answers; do
        if ! alive "$pid"; then
            die "dockerd exited before answering: $(last_line "$DOCKERD_LOG") (full log: $DOCKERD_LOG)"
        fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            die "dockerd did not answer on $SOCK within ${DOCKERD_TIMEOUT}s: $(last_line "$DOCKERD_LOG") (full log: $DOCKERD_LOG)"
        fi
        sleep 0.3
    done
    say "dockerd answers on $SOCK (pid $pid, up in $(elapsed "${t:-$(date +%s)}"))"
}

build_base_image() {
    local t partial="$STATE/rootfs.partial"
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        say "base image $BASE_IMAGE present"
        return 0
    fi
    if [ ! -e "$ROOTFS/.npyloader-complete" ]; then
        t=$(date +%s)
        rm -rf "$partial" "$ROOTFS"
        say "debootstrap $SUITE (minbase + python3, python3-venv, python3-pip) into $ROOTFS; takes a few minutes the first time (log: $DEBOOTSTRAP_LOG)"
        debootstrap --variant=minbase --include=python3,python3-venv,python3-pip \
            "$SUITE" "$partial" "$MIRROR" >"$DEBOOTSTRAP_LOG" 2>&1 \
            || die "debootstrap $SUITE failed: $(last_line "$DEBOOTSTRAP_LOG") (full log: $DEBOOTSTRAP_LOG)"
        # Downloaded .debs and package lists are not needed inside an image.
        rm -rf "$partial"/var/cache/apt/archives/*.deb "$partial"/var/lib/apt/lists/*
        touch "$partial/.npyloader-complete"
        mv "$partial" "$ROOTFS"
        say "rootfs ready in $(elapsed "$t")"
    else
        say "reusing cached rootfs $ROOTFS"
    fi
    t=$(date +%s)
    # Trust what this machine trusts: where HTTPS to the package index passes through a proxy
    # with its own CA, pip inside `docker build` needs that CA too (pip otherwise uses its own
    # bundled list). PIP_CERT and SSL_CERT_FILE point pip and Python at the copied bundle.
    if [ -r "$HOST_CA_BUNDLE" ]; then
        install -D -m 0644 "$HOST_CA_BUNDLE" "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
    fi
    say "importing $ROOTFS as $BASE_IMAGE"
    # An imported image has no config: give it the PATH and locale a Dockerfile expects.
    tar -C "$ROOTFS" --exclude=./.npyloader-complete -c . \
        | docker import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'ENV LANG=C.UTF-8' \
            --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
            --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
            --change 'CMD ["/bin/bash"]' \
            - "$BASE_IMAGE" >/dev/null \
        || die "docker import of $ROOTFS as $BASE_IMAGE failed"
    say "imported $BASE_IMAGE in $(elapsed "$t")"
}

ready_message() {
    say "engine ready; point docker and docker-compose at it with:"
    echo "export DOCKER_HOST=unix://$SOCK"
}

cmd_up() {
    [ "$(id -u)" -ne 0 ] || install_prometheus
    # Everything already in place (started earlier by root): nothing to do, root or not.
    if dockerd_pid >/dev/null && engine_answers && docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        say "dockerd already running (pid $(dockerd_pid)); base image $BASE_IMAGE present"
        ready_message
        return 0
    fi
    [ "$(id -u)" -eq 0 ] || die "not root (uid $(id -u)): installing packages and running dockerd need root"
    mkdir -p "$STATE"
    # One `up` at a time (make and the test fixture may both call it).
    exec 9>"$STATE/lock"
    flock 9
    install_packages
    start_dockerd
    build_base_image
    ready_message
}

cmd_down() {
    local pid deadline
    if ! pid="$(dockerd_pid)"; then
        say "no dockerd started by this script is running"
        return 0
    fi
    [ "$(id -u)" -eq 0 ] || die "not root (uid $(id -u)): cannot stop dockerd (pid $pid)"
    say "stopping dockerd (pid $pid); images and caches under $STATE stay"
    kill -TERM "$pid"
    deadline=$(( $(date +%s) + 30 ))
    while alive "$pid" && [ "$(date +%s)" -lt "$deadline" ]; do
        sleep 0.2
    done
    if alive "$pid"; then
        say "dockerd did not stop within 30s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$PIDFILE"
    # dockerd leaves its network namespace bind-mounted (exec/netns/default): unmount what is
    # still mounted under our folder, deepest first, so that it can be deleted.
    awk -v s="$STATE/" 'index($2, s) == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
    say "dockerd stopped"
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    env) echo "export DOCKER_HOST=unix://$SOCK" ;;
    *) usage ;;
esac
