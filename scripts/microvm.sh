# The guest image of micro-VM instances, shared by scripts/up and scripts/test.
# shellcheck shell=bash
#
#   ensure_microvm_image BINARY   exports TRELLIS_MICROVM_KERNEL and TRELLIS_MICROVM_INITRD
#
# The kernel is Debian's cloud kernel (linux-image-cloud-amd64; 6.1 on bookworm), unpacked from
# its package with dpkg-deb, never installed. Bookworm also offers 6.12
# (linux-image-6.12-cloud-amd64), which the image takes as well (TRELLIS_GUEST_KERNEL names the
# meta-package): its guests reset memory in place (PAGEMAP_SCAN), but under TCG that made calls
# no faster in the last measurement and it boots 0.5-0.9 s slower, so 6.1 stays the default.
# The initramfs holds BINARY (a trellis-host; it runs as the guest's /init and serves its host),
# the shared libraries ldd lists for it, the dynamic loader, and those of the channel's drivers
# (virtio_ring, virtio, virtio_mmio, virtio_console) the kernel builds as modules, decompressed.
# Nothing else: no shell, no network, no disk. QEMU comes from Debian's qemu-system-x86 (7.2 on
# bookworm; 10.0 from bookworm-backports made calls no faster under TCG in the last measurement).
#
# Idempotent: the initramfs is rebuilt only when the SHA-256 of its inputs (this file, the binary,
# the libraries, the modules) changes.

ensure_qemu() {
    ensure_debian_tool TRELLIS_MICROVM_QEMU qemu-system-x86_64 qemu-system-x86
}

# The guest kernel's directory: one per meta-package.
guest_kernel_dir() {
    local meta="${TRELLIS_GUEST_KERNEL:-linux-image-cloud-amd64}"
    if [ "$meta" = linux-image-cloud-amd64 ]; then
        echo "$(tools_dir)/microvm-kernel"
    else
        echo "$(tools_dir)/microvm-kernel-$meta"
    fi
}

# Unpacks the newest kernel of the meta-package into guest_kernel_dir once; later calls reuse it
# without asking apt.
ensure_guest_kernel() {
    local dir meta="${TRELLIS_GUEST_KERNEL:-linux-image-cloud-amd64}"
    dir="$(guest_kernel_dir)"
    if [ ! -f "$dir/vmlinuz" ] || [ ! -d "$dir/modules" ]; then
        if [ -z "$apt_updated" ]; then
            as_root apt-get update -qq
            apt_updated=1
        fi
        local package
        package="$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')"
        if [ -z "$package" ]; then
            echo "error: Debian offers no $meta kernel" >&2
            return 1
        fi
        echo "unpacking the micro-VM guest kernel ($package)"
        local work
        work="$(mktemp -d)"
        (cd "$work" && apt-get download -q "$package" >/dev/null 2>&1) || {
            rm -rf "$work"
            echo "error: cannot download $package" >&2
            return 1
        }
        dpkg-deb -x "$work"/*.deb "$work/root"
        rm -rf "$dir.new"
        mkdir -p "$dir.new/modules"
        cp "$work"/root/boot/vmlinuz-* "$dir.new/vmlinuz"
        # Each driver of the channel is a module (plain or compressed) or built in; the agent
        # loads the modules it finds, in this order.
        # Older packages put modules under /lib, newer ones (merged /usr) under /usr/lib.
        local modules
        modules="$(ls -d "$work"/root/lib/modules/* "$work"/root/usr/lib/modules/* 2>/dev/null | head -n 1 || true)"
        local m src
        for m in virtio/virtio_ring virtio/virtio virtio/virtio_mmio char/virtio_console; do
            src="$(ls "$modules"/kernel/drivers/"$m".ko* 2>/dev/null | head -n 1 || true)"
            case "$src" in
                *.ko) cp "$src" "$dir.new/modules/" ;;
                *.ko.xz) xz -dc "$src" >"$dir.new/modules/$(basename "$m").ko" ;;
                *.ko.zst) zstd -qdc "$src" >"$dir.new/modules/$(basename "$m").ko" ;;
                "")
                    if ! grep -q "kernel/drivers/$m.ko" "$modules"/modules.builtin 2>/dev/null; then
                        rm -rf "$work" "$dir.new"
                        echo "error: $package has no $m driver" >&2
                        return 1
                    fi
                    ;;
                *)
                    rm -rf "$work" "$dir.new"
                    echo "error: cannot unpack $src" >&2
                    return 1
                    ;;
            esac
        done
        echo "$package" >"$dir.new/package"
        rm -rf "$work" "$dir"
        mv "$dir.new" "$dir"
    fi
    TRELLIS_MICROVM_KERNEL="$dir/vmlinuz"
    export TRELLIS_MICROVM_KERNEL
}

ensure_microvm_image() {
    local binary="$1"
    if [ ! -x "$binary" ]; then
        echo "error: $binary is missing: build trellis-host first" >&2
        return 1
    fi
    ensure_qemu
    ensure_guest_kernel
    local kernel_dir out libs inputs
    kernel_dir="$(guest_kernel_dir)"
    out="$(dirname "$binary")/microvm"
    mkdir -p "$out"
    libs="$({ ldd "$binary" 2>/dev/null || true; } | awk '
        $2 == "=>" && $3 ~ /^\// { print $3 }
        $1 ~ /^\// { print $1 }
    ' | sort -u)"
    # shellcheck disable=SC2086
    inputs="$({
        sha256sum "${BASH_SOURCE[0]}" "$binary" $libs "$kernel_dir"/package
        find "$kernel_dir/modules" -name '*.ko' -exec sha256sum {} + | sort
    } | sha256sum | cut -d' ' -f1)"
    if [ -f "$out/initrd.cpio" ] && [ "$(cat "$out/inputs" 2>/dev/null)" = "$inputs" ]; then
        TRELLIS_MICROVM_INITRD="$out/initrd.cpio"
        export TRELLIS_MICROVM_INITRD
        return
    fi
    echo "building the micro-VM guest initramfs from $binary"
    local root
    root="$(mktemp -d)"
    mkdir -p "$root/dev" "$root/proc" "$root/tmp" "$root/lib/modules"
    # Debug information only slows the guest's boot: symbols stay for backtraces.
    objcopy --strip-debug "$binary" "$root/init"
    local f
    for f in $libs; do
        mkdir -p "$root$(dirname "$f")"
        cp -L "$f" "$root$f"
    done
    find "$kernel_dir/modules" -name '*.ko' -exec cp {} "$root/lib/modules/" \;
    python3 - "$root" "$out/initrd.cpio.new" <<'PY'
import os, stat, sys

root, target = sys.argv[1], sys.argv[2]
ino = 1

def entry(out, name, mode, data=b""):
    # The "newc" cpio format the kernel unpacks: a fixed ASCII header, the name, the data,
    # each padded to four bytes.
    global ino
    name_b = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name_b), 0]
    ino += 1
    out.write(("070701" + "".join("%08x" % v for v in fields)).encode())
    out.write(name_b)
    out.write(b"\0" * (-(110 + len(name_b)) % 4))
    out.write(data)
    out.write(b"\0" * (-len(data) % 4))

with open(target, "wb") as out:
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        if rel != ".":
            entry(out, rel, stat.S_IFDIR | 0o755)
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            mode = 0o755 if os.access(path, os.X_OK) else 0o644
            with open(path, "rb") as f:
                entry(out, os.path.normpath(os.path.join(rel, name)), stat.S_IFREG | mode, f.read())
    entry(out, "TRAILER!!!", 0)
PY
    rm -rf "$root"
    mv "$out/initrd.cpio.new" "$out/initrd.cpio"
    echo "$inputs" >"$out/inputs"
    TRELLIS_MICROVM_INITRD="$out/initrd.cpio"
    export TRELLIS_MICROVM_INITRD
}
