//! The micro-VM execution path: an instance whose guest code runs inside a QEMU `microvm` guest
//! of its own, under the same runtime, limits and capability checks as in process.
//!
//! A host runs micro-VMs when it is given a kernel and an initramfs (`ensure_microvm_image` in `scripts/microvm.sh`
//! builds both: Debian's cloud kernel, and this very binary as the guest's `/init` with the
//! channel's kernel modules). At start it probes QEMU and how to accelerate it: KVM when
//! `/dev/kvm` offers hardware virtualisation, QEMU's emulation (TCG) otherwise, and reports the
//! result in `host.started` and heartbeats so that the scheduler places `microvm` instances
//! only here.
//!
//! Per instance the host boots one VM ([`vm::Vm`]) and talks to its agent ([`agent`]) over one
//! virtio-serial port ([`protocol`]): not vsock, because that needs the host kernel's
//! `vhost_vsock` (absent in containers and in many VMs), and not the emulated 8250 UART, which
//! moves about 35 KB/s under TCG against ~35 MB/s for virtio-serial. The guest has no network
//! device and no disk but its initramfs; its only door is the port, and every capability call
//! through it enters the same deny-by-default bridge as an in-process instance's.
//!
//! The host also loads the component itself (from its compile cache), to check it and know its
//! exports; the guest's code runs only in the VM.

pub mod agent;

/// Set (by the kernel command line the host gives) in the environment of a micro-VM's init:
/// `trellis-host` started as PID 1 with it runs as the guest's agent.
pub const AGENT_ENV: &str = "TRELLIS_MICROVM_AGENT";
pub mod protocol;
pub(crate) mod vm;

use vm::Code;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use trellis_schemas::instance::ManifestDoc;
use trellis_schemas::isolation::Acceleration;

use crate::runtime::CapabilityBridge;
use vm::{Vm, VmEnd};

/// What a guest needs besides its component's memory: the kernel, the unpacked initramfs and
/// the runtime.
const GUEST_OVERHEAD_MIB: u64 = 192;

/// Virtual CPUs of a guest unless the host is told otherwise. One: under TCG a second vCPU
/// made calls slower, not faster (each instantiation beside a call shoots down the other
/// vCPU's TLB, which emulation pays dearly) and cold boots a second longer; see
/// [`MicrovmConfig::vcpus`].
pub const DEFAULT_VCPUS: u32 = 1;

/// How this host runs micro-VMs, found by [`MicrovmConfig::probe`].
#[derive(Debug, Clone)]
pub struct MicrovmConfig {
    /// The QEMU binary (`qemu-system-x86_64`).
    pub qemu: PathBuf,
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The guest initramfs.
    pub initrd: PathBuf,
    /// Guest memory at least, in MiB; a component's `max_memory` plus 192 MiB when larger.
    pub memory_mib: u64,
    /// KVM or TCG.
    pub acceleration: Acceleration,
    /// For TCG: the host's TSC frequency in kHz, which the guest cannot calibrate by itself.
    tsc_khz: Option<u64>,
    /// How many guests to keep booted ahead of need (0: none).
    pub pool_size: usize,
    /// Virtual CPUs of each guest (at least 1). With a second one the guest drops an ended
    /// invocation's store and instantiates the next spare on it, beside the next call rather
    /// than before it; with one, both follow each answer on the agent's thread.
    pub vcpus: u32,
    pool: Arc<Pool>,
}

/// Guests booted ahead of need, with no component yet: a start takes one and only loads its
/// component into it.
#[derive(Debug, Default)]
struct Pool {
    ready: std::sync::Mutex<Vec<vm::Booted>>,
    booting: std::sync::atomic::AtomicUsize,
}

impl MicrovmConfig {
    /// Checks that QEMU runs and the guest image exists, and finds the acceleration:
    /// `TRELLIS_MICROVM_ACCEL=kvm|tcg` when set, else KVM when `/dev/kvm` opens and the CPU has
    /// hardware virtualisation (not a paravirtual KVM that runs only its own guests), else TCG.
    ///
    /// # Errors
    ///
    /// What is missing, for people.
    pub fn probe(
        qemu: Option<PathBuf>,
        kernel: &Path,
        initrd: &Path,
        memory_mib: u64,
    ) -> Result<Self, String> {
        let qemu = qemu.unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"));
        let version = std::process::Command::new(&qemu)
            .arg("--version")
            .output()
            .map_err(|e| {
                format!(
                    "{} does not run ({e}); install Debian's qemu-system-x86",
                    qemu.display()
                )
            })?;
        if !version.status.success() {
            return Err(format!("{} --version failed", qemu.display()));
        }
        for (what, path) in [("kernel", kernel), ("initramfs", initrd)] {
            if !path.is_file() {
                return Err(format!(
                    "the guest {what} {} does not exist; build it with ensure_microvm_image in scripts/microvm.sh (scripts/up does)",
                    path.display()
                ));
            }
        }
        sweep_stale_dirs();
        let acceleration = match std::env::var("TRELLIS_MICROVM_ACCEL").as_deref() {
            Ok("kvm") => Acceleration::Kvm,
            Ok("tcg") => Acceleration::Tcg,
            _ => detect_acceleration(),
        };
        Ok(Self {
            qemu,
            kernel: kernel.to_owned(),
            initrd: initrd.to_owned(),
            memory_mib: memory_mib.max(128),
            acceleration,
            tsc_khz: tsc_khz(),
            pool_size: 0,
            vcpus: DEFAULT_VCPUS,
            pool: Arc::default(),
        })
    }

    /// Keeps the pool at [`pool_size`](Self::pool_size) booted guests, booting what is
    /// missing in the background (one at a time). Must be called within a Tokio runtime.
    pub fn warm(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        let have = self.pool.ready.lock().map_or(0, |r| r.len());
        if have + self.pool.booting.load(Ordering::SeqCst) >= self.pool_size
            || self.pool.booting.fetch_add(1, Ordering::SeqCst) > 0
        {
            return;
        }
        let config = Arc::clone(self);
        tokio::spawn(async move {
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
            loop {
                let have = config.pool.ready.lock().map_or(0, |r| r.len());
                if have >= config.pool_size {
                    break;
                }
                let name = format!("pool-{}", NEXT.fetch_add(1, Ordering::Relaxed));
                match Vm::start_guest(&config, &name, config.memory_mib).await {
                    Ok(booted) => {
                        tracing::debug!(
                            booted_ms = booted.booted_in.as_millis() as u64,
                            "micro-VM pooled"
                        );
                        if let Ok(mut ready) = config.pool.ready.lock() {
                            ready.push(booted);
                            pool_gauge(ready.len());
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot boot a micro-VM for the pool");
                        break;
                    }
                }
            }
            config.pool.booting.store(0, Ordering::SeqCst);
        });
    }

    /// A pooled guest with at least `memory_mib` of memory, if one is ready.
    fn take(self: &Arc<Self>, memory_mib: u64) -> Option<vm::Booted> {
        let taken = {
            let mut ready = self.pool.ready.lock().ok()?;
            let at = ready.iter().position(|b| b.memory_mib >= memory_mib)?;
            let taken = ready.swap_remove(at);
            pool_gauge(ready.len());
            taken
        };
        self.warm();
        Some(taken)
    }

    /// Guest memory for a component that may use `max_memory` bytes.
    fn memory_for(&self, max_memory: u64) -> u64 {
        let needed = max_memory.div_ceil(1024 * 1024) + GUEST_OVERHEAD_MIB;
        self.memory_mib.max(needed)
    }

    /// How long past an invocation's timeout the host waits before it kills the VM.
    fn margin(&self) -> Duration {
        match self.acceleration {
            Acceleration::Kvm => Duration::from_secs(2),
            Acceleration::Tcg => Duration::from_secs(10),
        }
    }

    /// QEMU's command line for a VM whose files are in `dir`.
    fn qemu_args(&self, dir: &Path, socket: &Path, memory_mib: u64) -> Vec<String> {
        // A `name=value` without a dot that the kernel does not know goes to init's environment.
        let mut append = format!("console=ttyS0 quiet panic=-1 reboot=t {AGENT_ENV}=1");
        let cpu = match self.acceleration {
            Acceleration::Kvm => "host,-arch-capabilities",
            Acceleration::Tcg => {
                // Without a reference clock the guest cannot calibrate its TSC under TCG and
                // hangs at boot; the TSC there runs at the host's rate.
                append.push_str(&format!(
                    " tsc_early_khz={}",
                    self.tsc_khz.unwrap_or(2_000_000)
                ));
                // Without ERMS and FSRM, the guest's libc and kernel copy and fill memory with
                // vector loops, which TCG translates well, instead of `rep movsb`/`rep stosb`,
                // which it runs a byte at a time: calls take about a tenth less time.
                "max,-erms,-fsrm"
            }
        };
        [
            "-M",
            "microvm",
            "-accel",
            // TCG's translation cache defaults to 1 GiB: a small one keeps each VM's memory
            // near its guest's.
            // Each vCPU on a host thread of its own (QEMU's default for x86 guests on x86 hosts,
            // said here so that no build falls back to one thread for all).
            match self.acceleration {
                Acceleration::Kvm => "kvm",
                Acceleration::Tcg => "tcg,thread=multi,tb-size=64",
            },
            "-cpu",
            cpu,
            "-m",
            &format!("{memory_mib}M"),
            "-smp",
            &self.vcpus.max(1).to_string(),
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-kernel",
            &self.kernel.to_string_lossy(),
            "-initrd",
            &self.initrd.to_string_lossy(),
            "-append",
            &append,
            "-serial",
            &format!("file:{}", dir.join("console.log").display()),
            "-device",
            "virtio-serial-device",
            "-chardev",
            &format!("socket,id=channel,path={}", socket.display()),
            "-device",
            "virtserialport,chardev=channel,name=trellis",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect()
    }
}

/// Removes the directories of VMs whose host process is gone (killed before it could clean
/// up): `trellis-vm-<pid>-<n>` in the temporary directory.
fn sweep_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("trellis-vm-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn detect_acceleration() -> Acceleration {
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let hardware = std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| {
        info.lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
    });
    // A paravirtual KVM (kvm_pvm) runs only guest kernels built for it: emulate instead.
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    if kvm && hardware && !pvm {
        Acceleration::Kvm
    } else {
        Acceleration::Tcg
    }
}

fn tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}

/// The micro-VM of one instance: booted at start, booted again after it died.
#[derive(Debug)]
pub(crate) struct MicroVm {
    config: Arc<MicrovmConfig>,
    /// The instance's id: QEMU runs as `trellis-vm-<id>` in process listings.
    instance: String,
    code: Code,
    manifest: ManifestDoc,
    bridge: Arc<dyn CapabilityBridge>,
    component: crate::runtime::LoadedComponent,
    current: Option<Arc<Vm>>,
}

impl MicroVm {
    /// Boots the instance's first VM for `component` (whose code is `wasm`), compiled by
    /// `runtime` for the guest's CPU first, so that the guest maps it rather than compiling
    /// under emulation (it compiles the `.wasm` itself when the artifact does not fit).
    pub async fn start(
        config: Arc<MicrovmConfig>,
        runtime: crate::runtime::Runtime,
        instance: String,
        wasm: bytes::Bytes,
        bridge: Arc<dyn CapabilityBridge>,
        component: crate::runtime::LoadedComponent,
    ) -> Result<Self, String> {
        let manifest =
            ManifestDoc::from_manifest(component.manifest()).map_err(|e| e.to_string())?;
        let compiled = {
            let wasm = wasm.clone();
            tokio::task::spawn_blocking(move || runtime.precompile_portable(&wasm))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default()
        };
        let mut vm = Self {
            config,
            instance,
            code: Code { wasm, compiled },
            manifest,
            bridge,
            component,
            current: None,
        };
        vm.ready().await.map_err(|e| e.message)?;
        Ok(vm)
    }

    /// The acceleration its VMs run with.
    pub fn acceleration(&self) -> Acceleration {
        self.config.acceleration
    }

    /// The VM to serve with: the current one while it lives, else a new one.
    pub async fn ready(&mut self) -> Result<Arc<Vm>, VmEnd> {
        if let Some(vm) = &self.current
            && vm.alive()
        {
            return Ok(Arc::clone(vm));
        }
        self.current = None;
        let pooled = self
            .config
            .take(self.config.memory_for(self.manifest.max_memory_bytes));
        let from_pool = match pooled {
            Some(booted) => Vm::load(
                &self.config,
                booted,
                &self.code,
                &self.manifest,
                Arc::clone(&self.bridge),
                self.component.clone(),
            )
            .await
            .inspect_err(|e| tracing::warn!(error = %e, "a pooled micro-VM failed; booting one"))
            .ok(),
            None => None,
        };
        let started_from = if from_pool.is_some() { "pool" } else { "boot" };
        let booted = match from_pool {
            Some(vm) => Ok(vm),
            None => {
                Vm::boot(
                    &self.config,
                    &self.instance,
                    &self.code,
                    &self.manifest,
                    Arc::clone(&self.bridge),
                    self.component.clone(),
                )
                .await
            }
        };
        let vm = booted.map_err(|message| VmEnd {
            crash: trellis_schemas::dataplane::CrashReason::VmExit,
            message: format!("the micro-VM did not start: {message}"),
        })?;
        crate::metrics::HOST
            .microvm_starts
            .get_or_create(&[("from", started_from)])
            .inc();
        tracing::info!(
            instance = %self.instance,
            from = started_from,
            booted_ms = vm.booted_in.as_millis() as u64,
            load_ms = vm.compile_ms,
            precompiled = vm.precompiled,
            reset_in_place = vm.reset_in_place,
            acceleration = %self.config.acceleration,
            "micro-VM ready"
        );
        self.current = Some(Arc::clone(&vm));
        Ok(vm)
    }
}

/// Sets the metric of guests waiting in the pool.
fn pool_gauge(ready: usize) {
    crate::metrics::HOST
        .microvm_pool_ready
        .set(i64::try_from(ready).unwrap_or(i64::MAX));
}
