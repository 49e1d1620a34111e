//! Providers a host runs as child processes and supervises.
//!
//! `trellis.host.v1.<lattice>.<host>.provider.start` spawns `trellis-provider-<name>` (found in
//! the host's provider directories) with the lattice's NATS URL, the provider id chosen by the
//! controller and the settings of the request. The provider announces itself
//! (`provider.started`) and talks to everyone over NATS only. When the process dies without
//! being asked to stop, the host records `provider.crashed` and starts it again after a delay
//! that doubles with each crash in a row (0.5 s up to 30 s). `provider.stop` (and the host's
//! drain) send it SIGTERM: it drains, records `provider.stopped` and exits; it is not restarted.
//!
//! A start command with `embedded` runs the provider inside the host's process instead (for the
//! providers this host links: [`EMBEDDABLE`]). It is the same provider, with the same arguments
//! and its own NATS connection: it follows the assignments, serves its RPC subject in its queue
//! group and records the same facts. The difference is that this host's instances call it
//! through an [`EmbeddedProviders`] handle, without the NATS round trip to another process; the
//! price is isolation, since it lives and dies with the host. A run that fails or panics is
//! recorded as `provider.crashed` and restarted with the same backoff as a process.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use clap::Parser as _;
use futures::FutureExt as _;
use tokio::process::Command;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use trellis_bus::FactPublisher;
use trellis_provider_http_server::{HttpServerProvider, LocalTargets};
use trellis_provider_sdk::{LocalProvider, ProviderArgs};
use trellis_schemas::fact::{ProviderCrashed, ProviderStartFailed};
use trellis_schemas::instance::{StartProviderCommand, StopProviderCommand};
use trellis_schemas::{
    ErrorBody, ErrorCode, Event, FactData, HostId, Lattice, ProviderId, ProviderName,
};

/// The providers a host can run inside its own process.
pub const EMBEDDABLE: &[&str] = &["kv", "http-server"];

/// The first delay before restarting a crashed provider.
const FIRST_DELAY: Duration = Duration::from_millis(500);
/// The longest delay between restarts.
const MAX_DELAY: Duration = Duration::from_secs(30);
/// A provider that ran this long before dying starts again from the first delay.
const STABLE_AFTER: Duration = Duration::from_secs(60);
/// How long a stopped provider may take to drain before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Settings of a host's provider supervision.
#[derive(Debug, Clone)]
pub struct ProvidersConfig {
    /// The NATS URL handed to providers.
    pub nats_url: String,
    /// Where to look for `trellis-provider-<name>`, in order (then `PATH`).
    pub dirs: Vec<PathBuf>,
    /// A directory written by `trellis creds`: each provider then connects with its own
    /// credentials, `provider-<name>.nk` (and the messaging provider's application traffic with
    /// `app.nk`), instead of the host's.
    pub creds_dir: Option<PathBuf>,
}

impl ProvidersConfig {
    /// Looks for providers next to the running executable, then on `PATH`.
    pub fn new(nats_url: impl Into<String>) -> Self {
        let dirs = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(Path::to_path_buf))
            .into_iter()
            .collect();
        Self {
            nats_url: nats_url.into(),
            dirs,
            creds_dir: None,
        }
    }
}

/// The providers running inside this host's process, by name. The host's instances call a
/// provider through here when one of that name serves in the process, and over NATS otherwise.
/// Cloning shares them.
#[derive(Debug, Clone, Default)]
pub struct EmbeddedProviders {
    by_name: Arc<RwLock<HashMap<ProviderName, Vec<LocalProvider>>>>,
}

impl EmbeddedProviders {
    /// A serving provider named `name` in this process, if any.
    pub fn get(&self, name: &ProviderName) -> Option<LocalProvider> {
        self.by_name
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)?
            .iter()
            .find(|p| p.serving())
            .cloned()
    }

    fn add(&self, provider: LocalProvider) {
        self.by_name
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(provider.name().clone())
            .or_default()
            .push(provider);
    }

    fn remove(&self, id: &ProviderId) {
        let mut by_name = self.by_name.write().unwrap_or_else(PoisonError::into_inner);
        for providers in by_name.values_mut() {
            providers.retain(|p| p.id() != id);
        }
        by_name.retain(|_, providers| !providers.is_empty());
    }
}

/// The providers of one host. Cloning shares them.
#[derive(Debug, Clone)]
pub struct Providers {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: ProvidersConfig,
    publisher: FactPublisher,
    lattice: Lattice,
    host_id: HostId,
    source: String,
    children: Mutex<HashMap<ProviderId, Child>>,
    embedded: EmbeddedProviders,
    /// This host's instances, for an embedded `http-server`.
    local_http: Arc<dyn LocalTargets>,
}

#[derive(Debug)]
struct Child {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl Providers {
    /// Supervision of no providers yet; embedded ones are registered in `embedded`.
    pub fn new(
        config: ProvidersConfig,
        publisher: FactPublisher,
        lattice: Lattice,
        host_id: HostId,
        embedded: EmbeddedProviders,
        local_http: Arc<dyn LocalTargets>,
    ) -> Self {
        let source = trellis_schemas::fact::source(&lattice, "host", host_id.as_str());
        Self {
            inner: Arc::new(Inner {
                config,
                publisher,
                lattice,
                host_id,
                source,
                children: Mutex::new(HashMap::new()),
                embedded,
                local_http,
            }),
        }
    }

    /// The executable of provider `name`, if installed.
    fn executable(&self, name: &str) -> Option<PathBuf> {
        let file = format!("trellis-provider-{name}");
        let path_dirs = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .unwrap_or_default();
        self.inner
            .config
            .dirs
            .iter()
            .chain(path_dirs.iter())
            .map(|d| d.join(&file))
            .find(|p| p.is_file())
    }

    /// Accepts a start command: the provider is spawned (or, `embedded`, run in this process) and
    /// supervised in the background. A provider that is not installed, or that this host cannot
    /// embed, is reported as `provider.start_failed`.
    ///
    /// # Errors
    ///
    /// `invalid_request` when a provider with this id already runs here.
    pub fn start(&self, command: StartProviderCommand) -> Result<(), ErrorBody> {
        let mut children = self.lock();
        if children.contains_key(&command.provider_id) {
            return Err(ErrorBody::new(
                ErrorCode::InvalidRequest,
                format!(
                    "provider {} already runs on host {}",
                    command.provider_id, self.inner.host_id
                ),
            ));
        }
        let program = if command.embedded {
            if !EMBEDDABLE.contains(&command.name.as_str()) {
                start_failed(
                    &self.inner,
                    &command,
                    format!(
                        "this host cannot embed provider `{}` (it embeds {}); start it without --embedded",
                        command.name,
                        EMBEDDABLE.join(", ")
                    ),
                );
                return Ok(());
            }
            None
        } else {
            let Some(program) = self.executable(command.name.as_str()) else {
                let dirs: Vec<String> = self
                    .inner
                    .config
                    .dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect();
                start_failed(
                    &self.inner,
                    &command,
                    format!(
                        "no executable trellis-provider-{} in {} or on PATH",
                        command.name,
                        dirs.join(", ")
                    ),
                );
                return Ok(());
            };
            Some(program)
        };
        if let Some(dir) = &self.inner.config.creds_dir {
            let creds = provider_creds(dir, &command.name);
            if !creds.is_file() {
                start_failed(
                    &self.inner,
                    &command,
                    format!(
                        "no credentials for provider `{}`: {} is missing (`trellis creds {} --provider {}` writes them)",
                        command.name,
                        creds.display(),
                        dir.display(),
                        command.name
                    ),
                );
                return Ok(());
            }
        }
        let (stop, stopped) = watch::channel(false);
        let inner = Arc::clone(&self.inner);
        let id = command.provider_id.clone();
        let task = tokio::spawn(async move {
            match program {
                Some(program) => supervise(&inner, &program, &command, stopped).await,
                None => supervise_embedded(&inner, &command, stopped).await,
            }
            inner
                .children
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&command.provider_id);
        });
        children.insert(
            id,
            Child {
                stop,
                task: Some(task),
            },
        );
        Ok(())
    }

    /// Asks a supervised provider to drain and exit; it is not restarted.
    ///
    /// # Errors
    ///
    /// `not_found` when no such provider runs here.
    pub fn stop(&self, command: &StopProviderCommand) -> Result<(), ErrorBody> {
        let children = self.lock();
        let child = children.get(&command.provider_id).ok_or_else(|| {
            ErrorBody::new(
                ErrorCode::NotFound,
                format!(
                    "provider {} does not run on host {}",
                    command.provider_id, self.inner.host_id
                ),
            )
        })?;
        let _ = child.stop.send(true);
        Ok(())
    }

    /// Stops every provider and waits for them, up to `timeout`.
    pub async fn stop_all(&self, timeout: Duration) {
        let tasks: Vec<JoinHandle<()>> = self
            .lock()
            .values_mut()
            .filter_map(|c| {
                let _ = c.stop.send(true);
                c.task.take()
            })
            .collect();
        if tokio::time::timeout(timeout, futures::future::join_all(tasks))
            .await
            .is_err()
        {
            tracing::warn!(?timeout, "providers still stopping at the end of the drain");
        }
    }

    /// How many providers this host supervises.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether this host supervises no provider.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ProviderId, Child>> {
        self.inner
            .children
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// The credentials file of provider `name` in a directory `trellis creds` wrote.
fn provider_creds(dir: &Path, name: &ProviderName) -> PathBuf {
    dir.join(format!("provider-{name}.nk"))
}

/// The application credentials file in a directory `trellis creds` wrote.
const APP_CREDS: &str = "app.nk";

fn args(inner: &Inner, command: &StartProviderCommand) -> Vec<String> {
    let mut args = vec![
        "--nats".to_owned(),
        inner.config.nats_url.clone(),
        "--lattice".to_owned(),
        inner.lattice.to_string(),
        "--provider-id".to_owned(),
        command.provider_id.to_string(),
        "--host-id".to_owned(),
        inner.host_id.to_string(),
    ];
    if let Some(domain) = trellis_bus::jetstream_domain() {
        args.push("--js-domain".to_owned());
        args.push(domain.to_owned());
    }
    let config: &BTreeMap<String, String> = &command.config;
    for (k, v) in config {
        args.push("--config".to_owned());
        args.push(format!("{k}={v}"));
    }
    args
}

/// Runs the provider until it is stopped, restarting it with backoff when it dies.
async fn supervise(
    inner: &Inner,
    program: &Path,
    command: &StartProviderCommand,
    mut stop: watch::Receiver<bool>,
) {
    let args = args(inner, command);
    let mut restarts = Restarts::default();
    loop {
        let started = Instant::now();
        let mut cmd = Command::new(program);
        cmd.args(&args)
            .envs(trellis_bus::connect_env())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some(dir) = &inner.config.creds_dir {
            cmd.env(trellis_bus::ENV_CREDS, provider_creds(dir, &command.name));
            let app = dir.join(APP_CREDS);
            // Only the messaging provider carries application traffic.
            if command.name.as_str() == "messaging" && app.is_file() {
                cmd.env(trellis_bus::ENV_APP_CREDS, app);
            }
        }
        // The kernel sends the provider SIGTERM (a stop: drain, then `provider.stopped`) when
        // this host dies without stopping it, as on SIGKILL: it never outlives its host.
        let child = trellis_bus::spawn_tied(cmd).await;
        let mut child = match child {
            Ok(child) => child,
            Err(e) => {
                start_failed(
                    inner,
                    command,
                    format!("cannot run {}: {e}", program.display()),
                );
                return;
            }
        };
        tracing::info!(provider = %command.provider_id, name = %command.name, pid = child.id(), "provider process started");
        let status = tokio::select! {
            status = child.wait() => Some(status),
            _ = stop.wait_for(|s| *s) => None,
        };
        let Some(status) = status else {
            terminate(&mut child).await;
            return;
        };
        if *stop.borrow() {
            return;
        }
        let reason = match &status {
            Ok(s) if s.success() => {
                // It exited by itself after a stop request on its own control subject.
                tracing::info!(provider = %command.provider_id, "provider exited");
                return;
            }
            Ok(s) => describe(s),
            Err(e) => format!("cannot wait for the process: {e}"),
        };
        let delay = restarts.crashed(inner, command, started, reason);
        if stopped_during(delay, &mut stop).await {
            return;
        }
    }
}

/// Runs an embedded provider until it is stopped, restarting it with backoff when its run fails
/// or panics.
async fn supervise_embedded(
    inner: &Inner,
    command: &StartProviderCommand,
    mut stop: watch::Receiver<bool>,
) {
    let program = format!("trellis-provider-{}", command.name);
    let args =
        match ProviderArgs::try_parse_from(std::iter::once(program).chain(args(inner, command))) {
            Ok(mut args) => {
                // Connect as this host does, or as the provider where it has credentials.
                args.connect = trellis_bus::connect_args().clone();
                if let Some(dir) = &inner.config.creds_dir {
                    args.connect.creds = Some(provider_creds(dir, &command.name));
                }
                args
            }
            Err(e) => {
                start_failed(inner, command, format!("invalid provider settings: {e}"));
                return;
            }
        };
    let mut restarts = Restarts::default();
    loop {
        let started = Instant::now();
        let mut stopping = stop.clone();
        let shutdown = async move {
            let _ = stopping.wait_for(|s| *s).await;
            "requested".to_owned()
        };
        let registry = inner.embedded.clone();
        let run = embed(
            command.name.as_str(),
            args.clone(),
            Arc::clone(&inner.local_http),
            shutdown,
            move |local| {
                registry.add(local);
            },
        );
        tracing::info!(provider = %command.provider_id, name = %command.name, "embedded provider starting");
        let outcome = std::panic::AssertUnwindSafe(run).catch_unwind().await;
        inner.embedded.remove(&command.provider_id);
        if *stop.borrow() {
            return;
        }
        let reason = match outcome {
            Ok(Ok(())) => {
                // It stopped by itself after a stop request on its own control subject.
                tracing::info!(provider = %command.provider_id, "embedded provider ended");
                return;
            }
            Ok(Err(e)) => format!("failed: {e:#}"),
            Err(panic) => format!("panicked: {}", panic_message(panic.as_ref())),
        };
        let delay = restarts.crashed(inner, command, started, reason);
        if stopped_during(delay, &mut stop).await {
            return;
        }
    }
}

/// Runs the embedded provider `name` until `shutdown`; `serving` gets its handle once it serves.
async fn embed(
    name: &str,
    args: ProviderArgs,
    local_http: Arc<dyn LocalTargets>,
    shutdown: impl Future<Output = String> + Send,
    serving: impl FnOnce(LocalProvider) + Send + 'static,
) -> anyhow::Result<()> {
    match name {
        "kv" => {
            trellis_provider_sdk::run_embedded(
                trellis_provider_kv::INFO,
                args,
                trellis_provider_kv::KvProvider::new,
                shutdown,
                serving,
            )
            .await
        }
        "http-server" => {
            trellis_provider_sdk::run_embedded(
                trellis_provider_http_server::INFO,
                args,
                move |_ctx| async move { Ok(HttpServerProvider::embedded(local_http)) },
                shutdown,
                serving,
            )
            .await
        }
        other => anyhow::bail!("provider `{other}` cannot be embedded"),
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// The restarts of one supervised provider: how many, and the next delay, which doubles with
/// each crash in a row (from [`FIRST_DELAY`] up to [`MAX_DELAY`]).
#[derive(Debug)]
struct Restarts {
    count: u32,
    delay: Duration,
}

impl Default for Restarts {
    fn default() -> Self {
        Self {
            count: 0,
            delay: FIRST_DELAY,
        }
    }
}

impl Restarts {
    /// Records a crash of the run that began at `started` (`provider.crashed`); returns how long
    /// to wait before the next run.
    fn crashed(
        &mut self,
        inner: &Inner,
        command: &StartProviderCommand,
        started: Instant,
        reason: String,
    ) -> Duration {
        if started.elapsed() >= STABLE_AFTER {
            self.delay = FIRST_DELAY;
        }
        let delay = self.delay;
        self.delay = (self.delay * 2).min(MAX_DELAY);
        self.count = self.count.saturating_add(1);
        tracing::warn!(provider = %command.provider_id, %reason, ?delay, "provider crashed; restarting");
        publish(
            inner,
            Event::new(
                inner.source.clone(),
                FactData::ProviderCrashed(ProviderCrashed {
                    provider_id: command.provider_id.clone(),
                    host_id: inner.host_id.clone(),
                    reason,
                    will_restart: true,
                    restarts: self.count,
                }),
            )
            .caused_by(command.operation_id.clone()),
        );
        delay
    }
}

/// Waits `delay`; returns early, with `true`, if the provider is stopped meanwhile.
async fn stopped_during(delay: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => false,
        _ = stop.wait_for(|s| *s) => true,
    }
}

fn start_failed(inner: &Inner, command: &StartProviderCommand, reason: String) {
    publish(
        inner,
        Event::new(
            inner.source.clone(),
            FactData::ProviderStartFailed(ProviderStartFailed {
                provider_id: command.provider_id.clone(),
                name: command.name.clone(),
                host_id: inner.host_id.clone(),
                reason,
            }),
        )
        .caused_by(command.operation_id.clone()),
    );
}

fn publish(inner: &Inner, event: Event) {
    if let Err(e) = inner.publisher.enqueue(&event) {
        tracing::error!(error = %e, "cannot queue a provider fact");
    }
}

fn describe(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => "ended".to_owned(),
    }
}

/// SIGTERM, then SIGKILL after the grace period.
async fn terminate(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(STOP_GRACE, child.wait())
        .await
        .is_err()
    {
        tracing::warn!("provider did not drain in time; killing it");
        let _ = child.kill().await;
    }
}
