//! The guest image of micro-VM instances, for tests: built (or found up to date) by
//! `scripts/microvm.sh` from the `trellis-host` the tests run, once per test process.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The kernel, initramfs and QEMU a host needs to run micro-VMs.
#[derive(Debug, Clone)]
pub struct Image {
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The guest initramfs (holding this build's `trellis-host` as `/init`).
    pub initrd: PathBuf,
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
}

impl Image {
    /// The `trellis-host` arguments that make a host run micro-VMs with this image.
    pub fn host_args(&self) -> Vec<String> {
        vec![
            "--microvm-kernel".into(),
            self.kernel.display().to_string(),
            "--microvm-initrd".into(),
            self.initrd.display().to_string(),
            "--microvm-qemu".into(),
            self.qemu.display().to_string(),
        ]
    }
}

/// Builds the image (installing QEMU and unpacking the kernel on first use) and returns it.
/// Panics with the script's output when that fails: a missing QEMU or kernel is a failure,
/// never a skipped test.
pub fn image() -> &'static Image {
    static IMAGE: OnceLock<Image> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let host = crate::bin("trellis-host");
        let out = std::process::Command::new("bash")
            .current_dir(&repo)
            .arg("-c")
            .arg(
                r#"set -euo pipefail
                . scripts/prereqs.sh
                . scripts/microvm.sh
                ensure_microvm_image "$1" >&2
                printf '%s\n%s\n%s\n' "$TRELLIS_MICROVM_KERNEL" "$TRELLIS_MICROVM_INITRD" "$TRELLIS_MICROVM_QEMU""#,
            )
            .arg("bash")
            .arg(&host)
            .output()
            .expect("runs bash");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = stdout.lines().collect();
        assert!(
            out.status.success() && lines.len() == 3,
            "cannot build the micro-VM guest image (scripts/microvm.sh): {}{}",
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        Image {
            kernel: lines[0].into(),
            initrd: lines[1].into(),
            qemu: lines[2].into(),
        }
    })
}
