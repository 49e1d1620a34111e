//! The etcd registry client against a real etcd on a free loopback port (Debian's
//! `etcd-server`; `TRELLIS_ETCD` overrides the binary): keys, leases, keep-alive, a lease lost and
//! registered again, and revocation on [`Registration::end`]. The multi-node suite checks the same
//! registry from hosts and providers in containers (tests/cluster/etcd.rs).

use std::path::PathBuf;
use std::time::Duration;

use trellis_bus::registry::{EtcdRegistry, Registration, RegistryError};
use trellis_tests::{Proc, free_port, lattice, wait_for};

/// One etcd member with its data in a temporary directory; killed on drop.
struct Etcd {
    url: String,
    _proc: Proc,
    _dir: tempfile::TempDir,
}

impl Etcd {
    async fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("trellis-etcd-")
            .tempdir()
            .unwrap();
        let (client, peer) = (free_port(), free_port());
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let args: Vec<String> = [
            "--name",
            "t",
            "--data-dir",
            &dir.path().join("data").display().to_string(),
            "--listen-client-urls",
            &client_url,
            "--advertise-client-urls",
            &client_url,
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
            "--initial-cluster",
            &format!("t={peer_url}"),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let binary = std::env::var_os("TRELLIS_ETCD")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("etcd"));
        let proc = Proc::spawn("etcd", &binary, &args, dir.path());
        let url = format!("etcd://127.0.0.1:{client}");
        let registry = EtcdRegistry::new(&url, &lattice("default")).unwrap();
        wait_for("etcd to answer", Duration::from_secs(30), || async {
            registry.list("").await.ok().map(|_| ())
        })
        .await;
        Self {
            url,
            _proc: proc,
            _dir: dir,
        }
    }
}

#[tokio::test]
async fn etcd_registry_keys_leases_and_registrations() {
    let etcd = Etcd::start().await;
    let registry = EtcdRegistry::new(&etcd.url, &lattice("default")).unwrap();

    // Plain keys: put, list by prefix in key order, delete.
    registry.put("/other/x", b"1", None).await.unwrap();
    let b = registry.provider_key("b");
    let a = registry.provider_key("a");
    registry.put(&b, b"{\"n\":2}", None).await.unwrap();
    registry.put(&a, b"{\"n\":1}", None).await.unwrap();
    let listed = registry.list(registry.prefix()).await.unwrap();
    let keys: Vec<&str> = listed.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, [a.as_str(), b.as_str()], "only the lattice's keys");
    assert_eq!(listed[0].value, b"{\"n\":1}");
    assert_eq!(listed[0].lease, 0);
    assert_eq!(
        registry.list("").await.unwrap().len(),
        3,
        "the whole keyspace"
    );
    registry.delete(&a).await.unwrap();
    registry.delete(&b).await.unwrap();
    assert!(registry.list(registry.prefix()).await.unwrap().is_empty());

    // A lease: keys attached to it, refreshed by keep-alive, gone when it is revoked.
    let lease = registry.grant(Duration::from_secs(10)).await.unwrap();
    assert!(lease > 0);
    registry.put(&a, b"leased", Some(lease)).await.unwrap();
    assert_eq!(
        registry.list(&a).await.unwrap()[0].lease,
        lease,
        "the key is attached to the lease"
    );
    let ttl = registry.keep_alive(lease).await.unwrap();
    assert!((1..=10).contains(&ttl), "keep-alive answers the TTL: {ttl}");
    registry.revoke(lease).await.unwrap();
    assert!(registry.list(&a).await.unwrap().is_empty());
    assert_eq!(
        registry.keep_alive(lease).await.unwrap(),
        0,
        "a revoked lease has no TTL left"
    );

    // A registration keeps its key alive past its TTL.
    let node = registry.node_key("n1");
    let mut registration = Registration::spawn(
        registry.clone(),
        node.clone(),
        b"{\"node_id\":\"n1\"}".to_vec(),
        Duration::from_secs(2),
    );
    assert!(registration.registered(Duration::from_secs(10)).await);
    let first = registry.list(&node).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_ne!(first[0].lease, 0);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let later = registry.list(&node).await.unwrap();
    assert_eq!(later, first, "kept alive on the same lease after 2.5 TTLs");

    // Its lease lost (as when etcd forgot it), it registers again on a new lease.
    registry.revoke(first[0].lease).await.unwrap();
    let again = wait_for(
        "the key registered again",
        Duration::from_secs(10),
        || async {
            let found = registry.list(&node).await.ok()?;
            found
                .into_iter()
                .next()
                .filter(|e| e.lease != first[0].lease)
        },
    )
    .await;
    assert_eq!(again.value, first[0].value);

    // Ended, it removes its key at once.
    registration.end().await;
    assert!(registry.list(&node).await.unwrap().is_empty());
}

#[tokio::test]
async fn an_unreachable_etcd_is_an_io_error() {
    let port = free_port();
    let registry =
        EtcdRegistry::new(&format!("etcd://127.0.0.1:{port}"), &lattice("default")).unwrap();
    match registry.list("").await {
        Err(RegistryError::Io { addr, message }) => {
            assert_eq!(addr, format!("127.0.0.1:{port}"));
            assert!(message.contains("onnect"), "{message}");
        }
        other => panic!("expected an I/O error, got {other:?}"),
    }
}
