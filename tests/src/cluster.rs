//! Multi-node lattices in Docker containers, for the `cluster` suite.
//!
//! A [`Cluster`] is one Docker network of its own with a NATS server (JetStream store on a named
//! volume) and whatever nodes a test adds: hosts with labels, controller replicas, provider nodes,
//! an etcd. The images are the ones `scripts/images` builds from the binaries in the target
//! directory (nothing is pulled); [`Cluster::start`] runs that script once per test process, which
//! takes well under a second when nothing changed.
//!
//! The test process itself reaches NATS through a port mapped on 127.0.0.1 (fixed for the
//! cluster's life, so it survives a NATS restart), and drives the lattice with the `trellis` CLI,
//! a [`CtlClient`] or plain NATS. Nodes reach NATS by container name on the cluster's network.
//!
//! Nodes can be killed (`SIGKILL`), paused and unpaused (cgroup freezer: the process is stopped
//! without being told, its connections stay open), started again, and NATS can be restarted on
//! its volume. Everything is removed when the cluster is dropped; when the test panicked, the
//! logs of every node are printed first.
//!
//! Docker is required: without it [`Cluster::start`] panics with a message saying so, it never
//! skips.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test support: failing loudly is the point"
)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use testcontainers::core::{IntoContainerPort, Mount, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};
use trellis_ctl::CtlClient;
use trellis_schemas::{Fact, Lattice};

use crate::{bin_dir, cli_at, facts_at, free_port, wait_for};

/// The label and value every container and volume of the suite carries, so that leftovers of an
/// interrupted run can be found (`docker ps -a --filter label=dev.trellis.suite=cluster`).
pub const SUITE_LABEL: (&str, &str) = ("dev.trellis.suite", "cluster");

/// The images the suite uses; `scripts/images` builds them.
pub const IMAGES: &[&str] = &[
    "trellis-nats:local",
    "trellis-host:local",
    "trellis-controller:local",
    "trellis-etcd:local",
];

/// Checks that Docker answers and builds the images (once per process). Panics, with what to do,
/// when Docker is absent or an image cannot be built.
pub fn ensure_images() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let info = Command::new("docker").arg("info").output();
        assert!(
            info.as_ref().is_ok_and(|o| o.status.success()),
            "the cluster suite needs Docker and `docker info` failed ({}); start the Docker \
             daemon (the suite never skips silently)",
            match &info {
                Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_owned(),
                Err(e) => e.to_string(),
            }
        );
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/images");
        let out = Command::new("bash")
            .arg(&script)
            .env("TRELLIS_BIN_DIR", bin_dir())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed:\n{}{}",
            script.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

fn docker(args: &[&str]) -> (bool, String) {
    let out = Command::new("docker").args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Waits until NATS accepts clients on `port` of 127.0.0.1.
async fn wait_for_nats(port: u16) {
    wait_for(
        "NATS on its mapped port",
        Duration::from_secs(30),
        || async move {
            async_nats::connect(format!("nats://127.0.0.1:{port}"))
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await;
}

fn create_volume(volume: &str) {
    let (ok, text) = docker(&[
        "volume",
        "create",
        "--label",
        &format!("{}={}", SUITE_LABEL.0, SUITE_LABEL.1),
        volume,
    ]);
    assert!(ok, "docker volume create {volume}: {text}");
}

/// Pings of a hub and its leaf nodes: a cut link is noticed within seconds on both sides (the
/// default of two minutes would keep the hub routing to a dead leaf connection, and refusing the
/// leaf's new one, for that long).
const LINK_PINGS: &str = "ping_interval: \"1s\"\nping_max: 3\nwrite_deadline: \"2s\"\n";

/// One node of a cluster: a container, and how it was started.
struct Node {
    container: ContainerAsync<GenericImage>,
    /// `host`, `controller`, `provider`, `etcd`.
    role: &'static str,
}

/// A NATS server of a clustered [`Cluster`] beyond the first.
struct Peer {
    /// `nats-1`, `nats-2`, …: the node name (the container is `<cluster>-<node>`).
    node: String,
    volume: String,
    port: u16,
    container: ContainerAsync<GenericImage>,
}

/// A lattice spread over containers on one Docker network.
pub struct Cluster {
    /// The prefix of every container, network and volume name of this cluster.
    pub name: String,
    /// The lattice the nodes join.
    pub lattice: Lattice,
    network: String,
    volume: String,
    nats_port: u16,
    nats: Option<ContainerAsync<GenericImage>>,
    /// The other servers of a NATS cluster ([`Cluster::start_clustered`]); empty for one server.
    peers: Vec<Peer>,
    nodes: BTreeMap<String, Node>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("name", &self.name)
            .field("nats_port", &self.nats_port)
            .field("nodes", &self.nodes.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Cluster {
    /// Builds the images if needed, then starts NATS on a fresh network and volume.
    pub async fn start(test: &str) -> Self {
        Self::start_clustered(test, 1).await
    }

    /// Like [`Cluster::start`], with NATS as a hub for leaf nodes: its JetStream in `domain`
    /// (processes behind a leaf reach it with `--js-domain <domain>`), accepting leaf node
    /// connections on port 7422 of its container without advertising it (see
    /// [`Cluster::leaf`]).
    pub async fn start_hub(test: &str, domain: &str) -> Self {
        let mut cluster = Self::start_clustered_with(test, 1, false).await;
        let config = format!(
            "server_name: hub\n{LINK_PINGS}jetstream {{ domain: {domain} }}\nleafnodes {{ listen: \"0.0.0.0:7422\", no_advertise: true }}\n"
        );
        let cmd = ["-c", "/etc/nats.conf", "-js", "-sd", "/data"]
            .map(str::to_owned)
            .to_vec();
        let volume = cluster.volume.clone();
        let network = cluster.network.clone();
        let container = cluster
            .nats_container_on(
                &network,
                "nats",
                Some(&volume),
                cluster.nats_port,
                Some(cmd),
                Some(config),
            )
            .await;
        cluster.nats = Some(container);
        cluster
    }

    /// Starts a NATS leaf node `node` without JetStream on a network of its own (`<node>`'s
    /// edge network), dialing the hub ([`Cluster::start_hub`]) over the cluster's network, to
    /// which it is connected as a second network: [`Cluster::partition`] of `node` cuts the
    /// leaf link and nothing else. Returns its URL for the test process (a mapped port).
    pub async fn leaf(&mut self, node: &str) -> String {
        assert!(!self.nodes.contains_key(node), "node {node} exists already");
        let config = format!(
            "server_name: {node}\n{LINK_PINGS}leafnodes {{ reconnect: \"1s\", remotes: [ {{ url: \"nats-leaf://{}:7422\" }} ] }}\n",
            self.container_name("nats")
        );
        let port = free_port();
        let network = self.edge_network(node);
        let cmd = vec!["-c".to_owned(), "/etc/nats.conf".to_owned()];
        let container = self
            .nats_container_on(&network, node, None, port, Some(cmd), Some(config))
            .await;
        self.nodes.insert(
            node.to_owned(),
            Node {
                container,
                role: "leaf",
            },
        );
        self.heal(node);
        format!("nats://127.0.0.1:{port}")
    }

    /// The network of leaf node `leaf`'s side.
    pub fn edge_network(&self, leaf: &str) -> String {
        format!("{}-{leaf}-net", self.name)
    }

    /// Starts a host node `id` behind leaf node `leaf`: on the leaf's network only, connected to
    /// the leaf, reaching the hub's JetStream with `--js-domain hub`.
    pub async fn host_behind(&mut self, leaf: &str, id: &str, labels: &[&str]) {
        let url = format!("nats://{}:4222", self.container_name(leaf));
        let mut extra = vec!["--js-domain", "hub"];
        for label in labels {
            extra.extend(["--label", label]);
        }
        let cmd = self.host_cmd(&url, id, &extra);
        let network = self.edge_network(leaf);
        self.add_on(&network, id, "host", "trellis-host:local", cmd, &[])
            .await;
    }

    /// Like [`Cluster::start`] with `servers` NATS servers routed into one JetStream cluster
    /// (`nats`, `nats-1`, `nats-2`, …, each with its own volume and mapped client port), and
    /// waits until the cluster places a stream with that many replicas. Nodes are given every
    /// server ([`Cluster::inner_url`]), the test process every mapped port ([`Cluster::url`]).
    pub async fn start_clustered(test: &str, servers: usize) -> Self {
        Self::start_clustered_with(test, servers, true).await
    }

    async fn start_clustered_with(test: &str, servers: usize, start_nats: bool) -> Self {
        assert!(servers >= 1, "a cluster has at least one NATS server");
        ensure_images();
        let id = ulid::Ulid::generate().to_string().to_lowercase();
        let name = format!("trellis-{test}-{}", &id[id.len() - 6..]);
        let volume = format!("{name}-js");
        create_volume(&volume);
        let mut cluster = Self {
            network: format!("{name}-net"),
            name,
            lattice: Lattice::new("default").unwrap(),
            volume,
            nats_port: free_port(),
            nats: None,
            peers: Vec::new(),
            nodes: BTreeMap::new(),
        };
        if servers == 1 {
            if start_nats {
                cluster.start_nats().await;
            }
            return cluster;
        }
        let names: Vec<String> = (0..servers)
            .map(|i| {
                if i == 0 {
                    "nats".to_owned()
                } else {
                    format!("nats-{i}")
                }
            })
            .collect();
        let routes = names
            .iter()
            .map(|n| format!("nats://{}:6222", cluster.container_name(n)))
            .collect::<Vec<_>>()
            .join(",");
        let cmd = |node: &str| -> Vec<String> {
            [
                "-js",
                "-sd",
                "/data",
                "-n",
                node,
                "--cluster_name",
                "trellis",
                "--cluster",
                "nats://0.0.0.0:6222",
                "--routes",
                &routes,
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect()
        };
        let first = cluster
            .nats_container(
                "nats",
                &cluster.volume.clone(),
                cluster.nats_port,
                Some(cmd("nats")),
            )
            .await;
        cluster.nats = Some(first);
        for node in &names[1..] {
            let volume = format!("{}-{node}-js", cluster.name);
            create_volume(&volume);
            let port = free_port();
            let container = cluster
                .nats_container(node, &volume, port, Some(cmd(node)))
                .await;
            cluster.peers.push(Peer {
                node: node.clone(),
                volume,
                port,
                container,
            });
        }
        let js = async_nats::jetstream::new(cluster.client().await);
        crate::wait_for_replicated_stream(&js, servers, Duration::from_secs(60)).await;
        cluster
    }

    fn container_name(&self, node: &str) -> String {
        format!("{}-{node}", self.name)
    }

    fn image(&self, image: &str) -> GenericImage {
        let (name, tag) = image.split_once(':').unwrap();
        GenericImage::new(name, tag)
    }

    async fn start_nats(&mut self) {
        let container = self
            .nats_container("nats", &self.volume.clone(), self.nats_port, None)
            .await;
        self.nats = Some(container);
    }

    /// Starts the NATS server `node` on `volume` with its client port mapped to `port` (the
    /// image's own arguments unless `cmd` is given), and waits until it accepts clients there.
    async fn nats_container(
        &self,
        node: &str,
        volume: &str,
        port: u16,
        cmd: Option<Vec<String>>,
    ) -> ContainerAsync<GenericImage> {
        self.nats_container_on(&self.network, node, Some(volume), port, cmd, None)
            .await
    }

    /// Starts a NATS server `node` on `network`, with its store on `volume` if given, its client
    /// port mapped to `port`, the image's own arguments unless `cmd` is given, and `config` as
    /// `/etc/nats.conf` if given; waits until it accepts clients on the mapped port.
    async fn nats_container_on(
        &self,
        network: &str,
        node: &str,
        volume: Option<&str>,
        port: u16,
        cmd: Option<Vec<String>>,
        config: Option<String>,
    ) -> ContainerAsync<GenericImage> {
        let image = self
            .image("trellis-nats:local")
            .with_wait_for(WaitFor::message_on_stderr("Server is ready"));
        let mut request = match cmd {
            Some(cmd) => image.with_cmd(cmd),
            None => image.into(),
        };
        if let Some(config) = config {
            request = request.with_copy_to("/etc/nats.conf", config.into_bytes());
        }
        if let Some(volume) = volume {
            request = request.with_mount(Mount::volume_mount(volume, "/data"));
        }
        let container = request
            .with_network(network)
            .with_container_name(self.container_name(node))
            .with_label(SUITE_LABEL.0, SUITE_LABEL.1)
            .with_mapped_port(port, 4222.tcp())
            .with_startup_timeout(Duration::from_secs(60))
            .start()
            .await
            .unwrap_or_else(|e| panic!("cannot start {node} of {}: {e}", self.name));
        wait_for_nats(port).await;
        container
    }

    /// The NATS URL for the test process (a port mapped on 127.0.0.1; of a NATS cluster, every
    /// server's, comma-separated, the first server's first).
    pub fn url(&self) -> String {
        std::iter::once(self.nats_port)
            .chain(self.peers.iter().map(|p| p.port))
            .map(|port| format!("nats://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The URL of one NATS server (`nats`, `nats-1`, …) for the test process.
    pub fn server_url(&self, server: &str) -> String {
        format!("nats://127.0.0.1:{}", self.server_port(server))
    }

    /// The port on 127.0.0.1 mapped to one NATS server's client port.
    fn server_port(&self, server: &str) -> u16 {
        if server == "nats" {
            self.nats_port
        } else {
            self.peer(server).port
        }
    }

    /// The NATS URL for nodes on the cluster's network (of a NATS cluster, every server's).
    pub fn inner_url(&self) -> String {
        std::iter::once("nats")
            .chain(self.peers.iter().map(|p| p.node.as_str()))
            .map(|node| format!("nats://{}:4222", self.container_name(node)))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn peer(&self, server: &str) -> &Peer {
        self.peers
            .iter()
            .find(|p| p.node == server)
            .unwrap_or_else(|| panic!("no NATS server {server} in {}", self.name))
    }

    fn container_of(&self, node: &str) -> String {
        if node == "nats" {
            self.nats.as_ref().expect("NATS runs").id().to_owned()
        } else if node.starts_with("nats-") {
            self.peer(node).container.id().to_owned()
        } else {
            self.container_id(node)
        }
    }

    /// Cuts `node` (a NATS server or any other node) off the cluster's network, as a network
    /// partition does: its connections to every other container break, and so does its mapped
    /// port.
    pub fn partition(&self, node: &str) {
        let (ok, text) = docker(&[
            "network",
            "disconnect",
            &self.network,
            &self.container_of(node),
        ]);
        assert!(ok, "docker network disconnect {node}: {text}");
    }

    /// Connects a partitioned `node` to the cluster's network again, under the same name.
    pub fn heal(&self, node: &str) {
        let (ok, text) = docker(&[
            "network",
            "connect",
            &self.network,
            &self.container_of(node),
        ]);
        assert!(ok, "docker network connect {node}: {text}");
    }

    async fn add(&mut self, node: &str, role: &'static str, image: &str, cmd: Vec<String>) {
        self.add_mapped(node, role, image, cmd, &[]).await;
    }

    /// Like `add`, with container ports mapped to free ports on 127.0.0.1.
    async fn add_mapped(
        &mut self,
        node: &str,
        role: &'static str,
        image: &str,
        cmd: Vec<String>,
        ports: &[u16],
    ) {
        let network = self.network.clone();
        self.add_on(&network, node, role, image, cmd, ports).await;
    }

    /// Like `add_mapped`, on `network`.
    async fn add_on(
        &mut self,
        network: &str,
        node: &str,
        role: &'static str,
        image: &str,
        cmd: Vec<String>,
        ports: &[u16],
    ) {
        assert!(!self.nodes.contains_key(node), "node {node} exists already");
        let mut request = self.image(image).with_cmd(cmd);
        for port in ports {
            request = request.with_mapped_port(free_port(), port.tcp());
        }
        let container = request
            .with_network(network)
            .with_container_name(self.container_name(node))
            .with_label(SUITE_LABEL.0, SUITE_LABEL.1)
            .with_env_var("RUST_LOG", "info,async_nats=warn")
            .with_startup_timeout(Duration::from_secs(60))
            .start()
            .await
            .unwrap_or_else(|e| panic!("cannot start {node} of {}: {e}", self.name));
        self.nodes.insert(node.to_owned(), Node { container, role });
    }

    /// Starts a host node `id` (also its host id) with `labels` (`k=v`), a 250 ms heartbeat and
    /// ceilings suited to the test guests, plus `extra` arguments.
    pub async fn host(&mut self, id: &str, labels: &[&str], extra: &[&str]) {
        self.host_with_ports(id, labels, extra, &[]).await;
    }

    /// Like [`Cluster::host`], with container `ports` mapped on 127.0.0.1 (see
    /// [`Cluster::host_port`]): for the listeners of an embedded `http-server`.
    pub async fn host_with_ports(
        &mut self,
        id: &str,
        labels: &[&str],
        extra: &[&str],
        ports: &[u16],
    ) {
        let mut all: Vec<&str> = Vec::new();
        for label in labels {
            all.extend(["--label", label]);
        }
        all.extend(extra);
        let cmd = self.host_cmd(&self.inner_url(), id, &all);
        self.add_mapped(id, "host", "trellis-host:local", cmd, ports)
            .await;
    }

    /// The command line of a host `id` connecting to `url`, with `extra` arguments at the end.
    fn host_cmd(&self, url: &str, id: &str, extra: &[&str]) -> Vec<String> {
        [
            "--nats",
            url,
            "--lattice",
            self.lattice.as_str(),
            "--host-id",
            id,
            "--heartbeat-interval",
            "250ms",
            "--max-memory",
            "64MiB",
            "--max-fuel",
            "1000000000000",
            "--pooling-instances",
            "64",
            "--cache-dir",
            "/tmp/cache",
        ]
        .iter()
        .chain(extra)
        .map(|s| (*s).to_owned())
        .collect()
    }

    /// Starts a controller replica node `replica` (also its replica id) that declares a host lost
    /// after `host_timeout` (`3s`) of silence.
    pub async fn controller(&mut self, replica: &str, host_timeout: &str) {
        let cmd: Vec<String> = [
            "--nats",
            &self.inner_url(),
            "--lattice",
            self.lattice.as_str(),
            "controller",
            "--host-timeout",
            host_timeout,
            "--replica-id",
            replica,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        self.add(replica, "controller", "trellis-controller:local", cmd)
            .await;
    }

    /// Starts a node `node` running the provider binary `trellis-provider-<provider>` with `args`
    /// after `--nats <url> --lattice <lattice>`.
    pub async fn provider(&mut self, node: &str, provider: &str, args: &[&str]) {
        self.provider_with_ports(node, provider, args, &[]).await;
    }

    /// Like [`Cluster::provider`], with container `ports` mapped on 127.0.0.1 (see
    /// [`Cluster::host_port`]): for the listeners of an `http-server` provider.
    pub async fn provider_with_ports(
        &mut self,
        node: &str,
        provider: &str,
        args: &[&str],
        ports: &[u16],
    ) {
        let image = format!("trellis-provider-{provider}:local");
        let mut cmd: Vec<String> = vec![
            "--nats".into(),
            self.inner_url(),
            "--lattice".into(),
            self.lattice.to_string(),
        ];
        cmd.extend(args.iter().map(|s| (*s).to_owned()));
        self.add_mapped(node, "provider", &image, cmd, ports).await;
    }

    /// Starts an etcd node `node` with its client port also mapped on 127.0.0.1 (see
    /// [`Cluster::host_port`]); returns its URL on the cluster's network
    /// (`etcd://<container>:2379`).
    pub async fn etcd(&mut self, node: &str) -> String {
        let url = format!("http://{}:2379", self.container_name(node));
        let cmd: Vec<String> = [
            "--name",
            node,
            "--data-dir",
            "/data",
            "--listen-client-urls",
            "http://0.0.0.0:2379",
            "--advertise-client-urls",
            &url,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        self.add_mapped(node, "etcd", "trellis-etcd:local", cmd, &[2379])
            .await;
        format!("etcd://{}:2379", self.container_name(node))
    }

    /// The port on 127.0.0.1 mapped to `port` of `node` (the node must expose it).
    pub async fn host_port(&self, node: &str, port: u16) -> u16 {
        self.node(node)
            .container
            .get_host_port_ipv4(port.tcp())
            .await
            .unwrap()
    }

    fn node(&self, node: &str) -> &Node {
        self.nodes
            .get(node)
            .unwrap_or_else(|| panic!("no node {node} in {}", self.name))
    }

    /// The container id of `node`.
    pub fn container_id(&self, node: &str) -> String {
        self.node(node).container.id().to_owned()
    }

    /// Kills `node` (a NATS server or any other node) with `SIGKILL`: no drain, no last words.
    pub fn kill(&self, node: &str) {
        let id = self.container_of(node);
        let (ok, text) = docker(&["kill", "--signal", "KILL", &id]);
        assert!(ok, "docker kill {node}: {text}");
    }

    /// Freezes every process of `node` (its sockets stay open, it just stops answering).
    pub async fn pause(&self, node: &str) {
        self.node(node).container.pause().await.unwrap();
    }

    /// Thaws a paused node.
    pub async fn unpause(&self, node: &str) {
        self.node(node).container.unpause().await.unwrap();
    }

    /// Starts a killed or stopped node again, with the same command line.
    pub async fn start_again(&self, node: &str) {
        self.node(node).container.start().await.unwrap();
    }

    /// Stops the NATS server `server` of a clustered NATS with `SIGTERM` (it hands its
    /// leaderships over and closes its clients), waiting up to 30 s for it to exit.
    pub fn stop_server(&self, server: &str) {
        let id = self.container_of(server);
        let (ok, text) = docker(&["stop", "--time", "30", &id]);
        assert!(ok, "docker stop {server}: {text}");
    }

    /// Starts a stopped or killed NATS server again on its volume, name and mapped port, and
    /// waits until it accepts clients.
    pub async fn start_server(&self, server: &str) {
        let id = self.container_of(server);
        let (ok, text) = docker(&["start", &id]);
        assert!(ok, "docker start {server}: {text}");
        wait_for_nats(self.server_port(server)).await;
    }

    /// Whether `node`'s container is running.
    pub async fn is_running(&self, node: &str) -> bool {
        self.node(node)
            .container
            .is_running()
            .await
            .unwrap_or(false)
    }

    /// Stops NATS (`SIGTERM`, then removes its container) and starts a new NATS container on the
    /// same volume, network name and mapped port. `down` is how long NATS stays away.
    pub async fn restart_nats(&mut self, down: Duration) {
        let old = self.nats.take().expect("NATS runs");
        old.stop_with_timeout(Some(10)).await.unwrap();
        old.rm().await.unwrap();
        tokio::time::sleep(down).await;
        self.start_nats().await;
    }

    /// Stops NATS without starting it again (see [`Cluster::start_nats_again`]).
    pub async fn stop_nats(&mut self) {
        let old = self.nats.take().expect("NATS runs");
        old.stop_with_timeout(Some(10)).await.unwrap();
        old.rm().await.unwrap();
    }

    /// Starts NATS again on its volume after [`Cluster::stop_nats`].
    pub async fn start_nats_again(&mut self) {
        assert!(self.nats.is_none(), "NATS runs already");
        self.start_nats().await;
    }

    /// The logs (stdout and stderr) of `node`, or of NATS for `"nats"`.
    pub fn logs(&self, node: &str) -> String {
        let id = if node == "nats" {
            match &self.nats {
                Some(c) => c.id().to_owned(),
                None => return String::new(),
            }
        } else {
            self.container_of(node)
        };
        docker(&["logs", &id]).1
    }

    /// The names of the nodes that have `role` (`host`, `controller`, …).
    pub fn nodes_with_role(&self, role: &str) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.role == role)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Runs the `trellis` CLI of the target directory against the cluster, from the test process.
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        cli_at(&self.url(), args)
    }

    /// A NATS client of the test process.
    pub async fn client(&self) -> async_nats::Client {
        async_nats::ConnectOptions::new()
            .max_reconnects(None)
            .connect(crate::servers(&self.url()))
            .await
            .unwrap()
    }

    /// A control client with a 10 s timeout.
    pub async fn ctl(&self) -> CtlClient {
        CtlClient::new(
            self.client().await,
            self.lattice.clone(),
            Duration::from_secs(10),
        )
    }

    /// Every fact in the lattice's stream, in order.
    pub async fn facts(&self) -> Vec<Fact> {
        facts_at(&self.url(), &self.lattice).await
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("==== logs of cluster {} (the test failed)", self.name);
            let servers =
                std::iter::once("nats".to_owned()).chain(self.peers.iter().map(|p| p.node.clone()));
            for node in self
                .nodes
                .keys()
                .cloned()
                .chain(servers)
                .collect::<Vec<_>>()
            {
                let logs = self.logs(&node);
                let tail: Vec<&str> = logs.lines().rev().take(60).collect();
                eprintln!("---- {node} (last {} lines)", tail.len());
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
        // Containers first (testcontainers removes each on drop, then the network once unused),
        // then the volume.
        self.nodes.clear();
        self.nats = None;
        let peers = std::mem::take(&mut self.peers);
        let volumes: Vec<String> = peers.iter().map(|p| p.volume.clone()).collect();
        drop(peers);
        let _ = docker(&["volume", "rm", "--force", &self.volume]);
        for volume in volumes {
            let _ = docker(&["volume", "rm", "--force", &volume]);
        }
    }
}
