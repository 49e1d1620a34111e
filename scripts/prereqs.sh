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

ensure_nats_server() {
    if [ -n "${TRELLIS_NATS_SERVER:-}" ] && [ -x "$TRELLIS_NATS_SERVER" ]; then return; fi
    if ! command -v nats-server >/dev/null; then
        echo "installing nats-server (Debian package)"
        apt_install nats-server
    fi
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
