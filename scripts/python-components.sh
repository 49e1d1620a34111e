# Builds Python WebAssembly components with componentize-py against the vendored WIT in wit/.
# Meant to be sourced: it only defines functions and constants.
#
#   source scripts/python-components.sh
#   ensure_componentize_py                      # sets COMPONENTIZE_PY
#   build_python_component examples/python-counter trellis:lattice/http-component out/python-counter.wasm
#
# shellcheck shell=bash

# The componentize-py release the Python components are built with, and the SHA-256 of its
# manylinux x86_64 wheel from PyPI (checked when installing on x86_64; other machines install by
# version alone).
COMPONENTIZE_PY_VERSION=0.25.1
COMPONENTIZE_PY_WHEEL_SHA256=8623cd8cab8453cb0cd8bf03f3c7103420d06f2f3d360186a280a70a1ca5e89f

# The repository root: the parent of this file's directory, wherever it is sourced from.
PYTHON_COMPONENTS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Where tools are installed: TRELLIS_TOOLS, else TRELLIS_TOOLS_DIR (scripts/prereqs.sh), else
# ~/.cache/trellis-tools.
python_components_tools_dir() {
    echo "${TRELLIS_TOOLS:-${TRELLIS_TOOLS_DIR:-$HOME/.cache/trellis-tools}}"
}

# Sets and exports COMPONENTIZE_PY to a componentize-py of COMPONENTIZE_PY_VERSION, installed from
# PyPI on first use into $(python_components_tools_dir)/componentize-py-VERSION (a `pip install
# --target` directory and a relocatable launcher, bin/componentize-py). Does nothing more when
# that install is already there. The install is built aside and moved in place, so an interrupted
# one leaves nothing half-done behind.
ensure_componentize_py() {
    local dir
    dir="$(python_components_tools_dir)/componentize-py-$COMPONENTIZE_PY_VERSION"
    if [ ! -x "$dir/bin/componentize-py" ] || [ ! -f "$dir/.complete" ]; then
        install_componentize_py "$dir" || return 1
    fi
    export COMPONENTIZE_PY="$dir/bin/componentize-py"
}

install_componentize_py() {
    local dir="$1" python tmp requirement
    python="$(command -v python3)" || {
        echo "error: componentize-py needs python3 (3.9 or later) to install and run" >&2
        return 1
    }
    echo "installing componentize-py $COMPONENTIZE_PY_VERSION (PyPI) into $dir"
    mkdir -p "$(dirname "$dir")" || return 1
    tmp="$(mktemp -d "$dir.tmp.XXXXXX")" || return 1
    requirement="componentize-py==$COMPONENTIZE_PY_VERSION"
    if [ "$(uname -m)" = x86_64 ]; then
        requirement="$requirement --hash=sha256:$COMPONENTIZE_PY_WHEEL_SHA256"
    fi
    echo "$requirement" >"$tmp/requirements.txt"
    # The wheel has no dependencies; --no-deps keeps pip from resolving anything else.
    if ! "$python" -m pip install -q --disable-pip-version-check --root-user-action=ignore \
        --no-deps --only-binary=:all: --no-compile --target "$tmp/site" \
        -r "$tmp/requirements.txt" >&2; then
        echo "error: could not install componentize-py $COMPONENTIZE_PY_VERSION from PyPI" >&2
        rm -rf "$tmp"
        return 1
    fi
    rm -f "$tmp/requirements.txt"
    # pip's own console script would not find the --target directory; this launcher does, from
    # wherever the directory is.
    mkdir -p "$tmp/bin"
    cat >"$tmp/bin/componentize-py" <<EOF
#!/bin/sh
here="\$(cd "\$(dirname "\$0")/.." && pwd)"
PYTHONPATH="\$here/site\${PYTHONPATH:+:\$PYTHONPATH}" exec "$python" -c 'import sys, componentize_py; sys.argv[0] = "componentize-py"; sys.exit(componentize_py.script())' "\$@"
EOF
    chmod 0755 "$tmp/bin/componentize-py"
    if [ "$("$tmp/bin/componentize-py" --version 2>&1)" != "componentize-py $COMPONENTIZE_PY_VERSION" ]; then
        echo "error: the installed componentize-py does not report version $COMPONENTIZE_PY_VERSION" >&2
        rm -rf "$tmp"
        return 1
    fi
    touch "$tmp/.complete"
    # Another shell may have finished the same install meanwhile: keep the first one in place.
    if [ -f "$dir/.complete" ]; then
        rm -rf "$tmp"
        return 0
    fi
    rm -rf "$dir"
    mv -T "$tmp" "$dir" 2>/dev/null || rm -rf "$tmp"
    [ -x "$dir/bin/componentize-py" ]
}

# A SHA-256 over everything a Python component's build depends on: the componentize-py version,
# the build recipe (build_python_component's own code), the world, the files of SRC_DIR (without
# bytecode caches) and of the WIT directory.
python_component_inputs_digest() {
    local src="$1" world="$2" wit="$3"
    {
        echo "componentize-py $COMPONENTIZE_PY_VERSION"
        declare -f build_python_component
        echo "world $world"
        (cd "$src" && find -L . -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 \
            | LC_ALL=C sort -z | xargs -0 -r sha256sum | sed 's/^/src /')
        (cd "$wit" && find -L . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum \
            | sed 's/^/wit /')
    } | sha256sum | cut -d' ' -f1
}

# build_python_component SRC_DIR WORLD [WIT_DIR] OUT_WASM: builds the component whose module is
# SRC_DIR/app.py for WORLD (e.g. trellis:lattice/http-component) of WIT_DIR (default: the
# repository's wit/ directory) into OUT_WASM. Skips the build when OUT_WASM and its stamp (OUT_WASM.inputs) show it
# was built from the same inputs. The bindings componentize-py generates stay in its own
# temporary directory; nothing is written into SRC_DIR.
build_python_component() {
    local src="$1" world="$2" out wit="$PYTHON_COMPONENTS_ROOT/wit" digest stamp tmp start
    case "$#" in
    3) out="$3" ;;
    4) wit="$(cd "$3" && pwd)" || return 1; out="$4" ;;
    *)
        echo "usage: build_python_component SRC_DIR WORLD [WIT_DIR] OUT_WASM" >&2
        return 2
        ;;
    esac
    if [ ! -f "$src/app.py" ]; then
        echo "error: $src/app.py does not exist" >&2
        return 1
    fi
    ensure_componentize_py || return 1
    src="$(cd "$src" && pwd)"
    digest="$(python_component_inputs_digest "$src" "$world" "$wit")" || return 1
    stamp="$out.inputs"
    if [ -f "$out" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ]; then
        echo "$out is up to date"
        return 0
    fi
    mkdir -p "$(dirname "$out")" || return 1
    tmp="$(mktemp -d "${TMPDIR:-/tmp}/python-component.XXXXXX")" || return 1
    echo "building $out from $src/app.py (componentize-py $COMPONENTIZE_PY_VERSION, world $world)"
    start=$SECONDS
    # componentize-py runs the app while building it, and that Python writes __pycache__ next to
    # the sources: build from a copy so SRC_DIR stays untouched. Its working directory is the
    # temporary one too, so whatever else it leaves behind is removed with it.
    if ! { mkdir "$tmp/src" && cp -R "$src/." "$tmp/src/" && rm -rf "$tmp/src/__pycache__"; }; then
        rm -rf "$tmp"
        return 1
    fi
    if ! (cd "$tmp" && "$COMPONENTIZE_PY" -q -d "$wit" -w "$world" \
        componentize -p "$tmp/src" app -o "$tmp/out.wasm"); then
        echo "error: componentize-py failed to build $src/app.py" >&2
        rm -rf "$tmp"
        return 1
    fi
    # The stamp goes only after the new output is in place, so an interrupted build reruns.
    rm -f "$stamp"
    if ! cp "$tmp/out.wasm" "$out.partial" || ! mv "$out.partial" "$out"; then
        rm -rf "$tmp" "$out.partial"
        return 1
    fi
    echo "$digest" >"$stamp"
    rm -rf "$tmp"
    echo "built $out ($(( $(stat -c %s "$out") / 1024 )) KiB) in $((SECONDS - start)) s"
}
