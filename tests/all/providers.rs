//! Provider contracts: each provider binary against a real nats-server and controller, with the
//! host side emulated by a plain NATS client that sends capability calls with identity headers,
//! and components emulated by subscribers on their data-plane subjects.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis_bus::dataplane::{self as codec, Identity};
use trellis_ctl::CtlClient;
use trellis_schemas::capability::rpc::{
    BrokerMessage, CapabilityRequest, CapabilityResponse, HttpMessage, HttpRequestHead,
    HttpResponseHead, KvReply, KvRequest, MessagingRequest,
};
use trellis_schemas::control::Reply;
use trellis_schemas::control::{
    AssignmentGrantReply, AssignmentGrantRequest, AssignmentListRequest, AssignmentRevokeRequest,
};
use trellis_schemas::dataplane::{self, Op, ProviderVerb, headers};
use trellis_schemas::{
    AssignmentId, AssignmentTarget, Capability, ComponentName, FactData, Lattice, ProviderId,
    ProviderName, subject,
};
use trellis_tests::{Nats, Proc, free_port, http_send, lattice, wait_for};

const T: Duration = Duration::from_secs(30);

/// A lattice with a controller, and a client that plays the host.
struct Env {
    nats: Nats,
    l: Lattice,
    ctl: CtlClient,
    client: async_nats::Client,
    _controller: Proc,
}

impl Env {
    async fn start(name: &str) -> Self {
        Self::on(Nats::start().await, name).await
    }

    /// The same, on a server already running (a cluster's member, say).
    async fn on(nats: Nats, name: &str) -> Self {
        let l = lattice(name);
        let controller = nats.controller(&l, "c", "30s");
        let ctl = nats.ctl(&l).await;
        wait_for("the controller", T, || async {
            ctl.request(&AssignmentListRequest::default()).await.ok()
        })
        .await;
        let client = nats.client().await;
        Self {
            nats,
            l,
            ctl,
            client,
            _controller: controller,
        }
    }

    /// Starts a provider and waits for its `provider.started` fact.
    async fn provider(&self, name: &str, args: &[&str]) -> (Proc, ProviderId) {
        let id = ProviderId::generate();
        let mut all = vec!["--provider-id", id.as_str()];
        all.extend_from_slice(args);
        let proc = self.nats.provider(&self.l, name, &all);
        let started = wait_for(&format!("{name} to start"), T, || async {
            self.nats
                .facts(&self.l)
                .await
                .into_iter()
                .find_map(|f| match f.event.data {
                    FactData::ProviderStarted(d) if d.provider_id == id => Some(d),
                    _ => None,
                })
        })
        .await;
        assert_eq!(started.name.as_str(), name);
        (proc, id)
    }

    async fn grant(
        &self,
        target: AssignmentTarget,
        capability: Capability,
        config: &[(&str, &str)],
    ) -> AssignmentGrantReply {
        self.ctl
            .request(&AssignmentGrantRequest {
                target,
                capability,
                provider: None,
                config: config
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect::<BTreeMap<_, _>>(),
            })
            .await
            .unwrap()
    }

    async fn revoke(&self, id: &AssignmentId) -> u64 {
        self.ctl
            .request(&AssignmentRevokeRequest {
                assignment_id: id.clone(),
            })
            .await
            .unwrap()
            .seq
    }

    /// A capability call as a host sends it, raw: identity headers and `body` as it is.
    /// `Ok((headers, body))` or `Err((code, message))`.
    async fn raw_call(
        &self,
        provider: &str,
        capability: Capability,
        caller: (&str, &str),
        body: Vec<u8>,
    ) -> Result<(HeaderMap, Vec<u8>), (String, String)> {
        let headers = trellis_tests::caller(caller.0, caller.1).headers();
        let subject =
            dataplane::provider_rpc(&self.l, &ProviderName::new(provider).unwrap(), capability);
        let reply = codec::request(&self.client, subject, headers, body.into(), T)
            .await
            .unwrap();
        match codec::read_reply(&reply) {
            Ok(()) => Ok((
                reply.headers.clone().unwrap_or_default(),
                reply.payload.to_vec(),
            )),
            Err(e) => Err((e.code.as_str().to_owned(), e.message)),
        }
    }

    /// A typed capability call through the data-plane codec, from a caller that reads only the
    /// provider's own replies (`direct` false) or, as a host, direct replies too.
    async fn call(
        &self,
        provider: &str,
        caller: (&str, &str),
        min_seq: Option<u64>,
        request: CapabilityRequest,
        direct: bool,
    ) -> Result<CapabilityResponse, (String, String)> {
        let identity = Identity {
            min_seq,
            assignment: Some("whatever-the-host-says".to_owned()),
            ..trellis_tests::caller(caller.0, caller.1)
        };
        trellis_tests::provider_call_as(
            &self.client,
            &self.l,
            provider,
            &identity,
            &request,
            direct,
        )
        .await
        .map_err(|e| (e.code.as_str().to_owned(), e.message))
    }

    /// A key-value call, sent both ways when JetStream may answer it directly (`get`,
    /// `exists`, `set`, `delete`, each idempotent): the provider's reply and the direct one
    /// must read the same.
    async fn kv(
        &self,
        caller: (&str, &str),
        min_seq: Option<u64>,
        request: &KvRequest,
    ) -> Result<KvReply, (String, String)> {
        let direct_too = matches!(
            request,
            KvRequest::Get { .. }
                | KvRequest::Exists { .. }
                | KvRequest::Set { .. }
                | KvRequest::Delete { .. }
        );
        let enveloped = self.kv_as(caller, min_seq, request, false).await;
        if !direct_too {
            return enveloped;
        }
        let direct = self.kv_as(caller, min_seq, request, true).await;
        // A backend briefly away may fail one and not the other (`unavailable`, transient).
        let unavailable = |r: &Result<KvReply, (String, String)>| matches!(r, Err((code, _)) if code == "unavailable");
        if unavailable(&enveloped) || unavailable(&direct) {
            return enveloped.and(direct);
        }
        assert_eq!(
            direct, enveloped,
            "the direct reply to {request:?} reads as the provider's own"
        );
        direct
    }

    async fn kv_as(
        &self,
        caller: (&str, &str),
        min_seq: Option<u64>,
        request: &KvRequest,
        direct: bool,
    ) -> Result<KvReply, (String, String)> {
        let request = CapabilityRequest::KeyValue(request.clone());
        match self.call("kv", caller, min_seq, request, direct).await? {
            CapabilityResponse::KeyValue(reply) => Ok(reply),
            other => panic!("not a key-value reply: {other:?}"),
        }
    }

    /// A control request to one provider process.
    /// A control request to one provider process: the `data` of its control envelope.
    async fn control(&self, name: &str, id: &ProviderId, verb: ProviderVerb) -> Value {
        let name = ProviderName::new(name).unwrap();
        let reply = self
            .client
            .request(
                dataplane::provider_control(&self.l, &name, id, verb),
                Vec::new().into(),
            )
            .await
            .unwrap();
        let reply: Reply<Value> = serde_json::from_slice(&reply.payload).unwrap();
        reply.into_result().unwrap()
    }

    /// Waits until provider `id` sees `n` assignments of its own.
    async fn wait_assignments(&self, name: &str, id: &ProviderId, n: u64) {
        wait_for(&format!("provider to see {n} assignments"), T, || async {
            (self.control(name, id, ProviderVerb::Health).await["assignments"] == n).then_some(())
        })
        .await;
    }
}

fn component(name: &str) -> AssignmentTarget {
    AssignmentTarget::Component(ComponentName::new(name).unwrap())
}

fn get(key: &str) -> KvRequest {
    KvRequest::Get {
        bucket: String::new(),
        key: key.into(),
    }
}

fn set(key: &str, value: &[u8]) -> KvRequest {
    KvRequest::Set {
        bucket: String::new(),
        key: key.into(),
        value: Bytes::copy_from_slice(value),
    }
}

#[tokio::test]
async fn kv_round_trips_and_isolates_buckets_by_assignment() {
    let env = Env::start("kv").await;
    let (_kv, kv_id) = env.provider("kv", &[]).await;
    let a = env
        .grant(component("ca"), Capability::KeyValue, &[("bucket", "a")])
        .await;
    let b = env
        .grant(component("cb"), Capability::KeyValue, &[("bucket", "b")])
        .await;
    let ia = ("ia", "ca");
    let ib = ("ib", "cb");

    // The grant is brand new: its fact sequence in the identity makes the provider wait for it.
    let reply = env
        .kv(
            ia,
            Some(a.seq),
            &KvRequest::Open {
                bucket: String::new(),
            },
        )
        .await
        .unwrap();
    assert_eq!(reply, KvReply::default());
    env.kv(ia, Some(a.seq), &set("greeting", b"hello"))
        .await
        .unwrap();
    let reply = env.kv(ia, None, &get("greeting")).await.unwrap();
    assert_eq!(reply.value.as_deref(), Some(&b"hello"[..]));
    assert_eq!(env.kv(ia, None, &get("missing")).await.unwrap().value, None);
    // A caller that reads direct replies gets JetStream's own: the stored message, with no
    // envelope; a refusal still comes in the provider's envelope.
    let raw = |request: KvRequest, caller: (&str, &str)| {
        let env = &env;
        let identity = trellis_tests::caller(caller.0, caller.1);
        async move {
            let request = CapabilityRequest::KeyValue(request);
            let (mut headers, body) = codec::capability_request(&identity, &request).unwrap();
            assert!(trellis_bus::direct::accept_direct(&request, &mut headers));
            let subject = dataplane::provider_rpc(
                &env.l,
                &ProviderName::new("kv").unwrap(),
                Capability::KeyValue,
            );
            codec::request(&env.client, subject, headers, body, T)
                .await
                .unwrap()
        }
    };
    let reply = raw(get("greeting"), ia).await;
    let h = reply.headers.clone().unwrap_or_default();
    assert!(h.get(headers::STATUS).is_none(), "{h:?}");
    assert!(h.get("Nats-Sequence").is_some(), "{h:?}");
    assert_eq!(&reply.payload[..], b"hello");
    let refused = KvRequest::Get {
        bucket: "b".into(),
        key: "greeting".into(),
    };
    let reply = raw(refused, ia).await;
    let h = reply.headers.clone().unwrap_or_default();
    assert_eq!(
        h.get(headers::ERROR_CODE).map(|v| v.as_str()),
        Some("access_denied"),
        "{h:?}"
    );
    // Opening by the bucket's own name is the same store.
    let named = KvRequest::Get {
        bucket: "a".into(),
        key: "greeting".into(),
    };
    assert!(env.kv(ia, None, &named).await.unwrap().value.is_some());

    // Atomic increments, created on first use, stored as decimal text.
    let inc = |delta| KvRequest::Increment {
        bucket: String::new(),
        key: "count".into(),
        delta,
    };
    assert_eq!(env.kv(ia, None, &inc(2)).await.unwrap().number, Some(2));
    assert_eq!(env.kv(ia, None, &inc(3)).await.unwrap().number, Some(5));
    assert_eq!(
        env.kv(ia, None, &get("count"))
            .await
            .unwrap()
            .value
            .as_deref(),
        Some(&b"5"[..])
    );
    let err = env
        .kv(
            ia,
            None,
            &KvRequest::Increment {
                bucket: String::new(),
                key: "greeting".into(),
                delta: 1,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.0, "invalid_request", "{err:?}");

    // Keys JetStream cannot hold round-trip; list_keys gives them back sorted.
    env.kv(ia, None, &set("with space/ü", b"x")).await.unwrap();
    env.kv(ia, None, &set(".dot", b"y")).await.unwrap();
    let reply = env
        .kv(
            ia,
            None,
            &KvRequest::ListKeys {
                bucket: String::new(),
                cursor: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        reply.keys,
        vec![".dot", "count", "greeting", "with space/ü"],
        "{reply:?}"
    );
    assert_eq!(reply.cursor, None);
    let reply = env
        .kv(
            ia,
            None,
            &KvRequest::Exists {
                bucket: String::new(),
                key: "with space/ü".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(reply.exists, Some(true));

    // Batches.
    env.kv(
        ia,
        None,
        &KvRequest::SetMany {
            bucket: String::new(),
            pairs: vec![
                ("m1".into(), Bytes::from_static(b"1")),
                ("m2".into(), Bytes::from_static(b"2")),
            ],
        },
    )
    .await
    .unwrap();
    let reply = env
        .kv(
            ia,
            None,
            &KvRequest::GetMany {
                bucket: String::new(),
                keys: vec!["m1".into(), "nope".into(), "m2".into()],
            },
        )
        .await
        .unwrap();
    assert_eq!(
        reply.values,
        vec![
            Some(Bytes::from_static(b"1")),
            None,
            Some(Bytes::from_static(b"2"))
        ]
    );
    // A batch's writes are stored in their order: a key written twice keeps the last value.
    env.kv(
        ia,
        None,
        &KvRequest::SetMany {
            bucket: String::new(),
            pairs: (0..20u8)
                .map(|i| ("twice".to_owned(), Bytes::from(vec![i])))
                .collect(),
        },
    )
    .await
    .unwrap();
    assert_eq!(
        env.kv(ia, None, &get("twice"))
            .await
            .unwrap()
            .value
            .as_deref(),
        Some(&[19u8][..])
    );
    env.kv(
        ia,
        None,
        &KvRequest::DeleteMany {
            bucket: String::new(),
            keys: vec!["m1".into(), "m2".into(), "twice".into()],
        },
    )
    .await
    .unwrap();
    assert_eq!(env.kv(ia, None, &get("twice")).await.unwrap().value, None);
    env.kv(
        ia,
        None,
        &KvRequest::Delete {
            bucket: String::new(),
            key: "greeting".into(),
        },
    )
    .await
    .unwrap();
    assert_eq!(env.kv(ia, None, &get("m1")).await.unwrap().value, None);
    assert_eq!(
        env.kv(ia, None, &get("greeting")).await.unwrap().value,
        None
    );

    // Instance A cannot reach B's bucket, by name or otherwise; B sees only its own data.
    for request in [
        KvRequest::Open { bucket: "b".into() },
        KvRequest::Get {
            bucket: "b".into(),
            key: "count".into(),
        },
    ] {
        let (code, message) = env.kv(ia, None, &request).await.unwrap_err();
        assert_eq!(code, "access_denied");
        assert!(
            message.contains("\"b\"") && message.contains("\"a\""),
            "{message}"
        );
    }
    env.kv(ib, Some(b.seq), &set("count", b"100"))
        .await
        .unwrap();
    assert_eq!(
        env.kv(ia, None, &get("count"))
            .await
            .unwrap()
            .value
            .as_deref(),
        Some(&b"5"[..])
    );

    // Two components granted the same bucket share it.
    let s1 = env
        .grant(
            component("cs1"),
            Capability::KeyValue,
            &[("bucket", "shared")],
        )
        .await;
    let s2 = env
        .grant(
            component("cs2"),
            Capability::KeyValue,
            &[("bucket", "shared")],
        )
        .await;
    env.kv(("i1", "cs1"), Some(s1.seq), &set("k", b"together"))
        .await
        .unwrap();
    let reply = env
        .kv(("i2", "cs2"), Some(s2.seq), &get("k"))
        .await
        .unwrap();
    assert_eq!(reply.value.as_deref(), Some(&b"together"[..]));

    // Without an assignment, or after its revocation: access denied.
    let (code, _) = env.kv(("ix", "cx"), None, &get("k")).await.unwrap_err();
    assert_eq!(code, "access_denied");
    env.revoke(&a.assignment.assignment_id).await;
    env.wait_assignments("kv", &kv_id, 3).await;
    let (code, message) = env.kv(ia, None, &get("count")).await.unwrap_err();
    assert_eq!(code, "access_denied", "{message}");

    // Malformed calls are refused as such.
    let err = env
        .raw_call("kv", Capability::KeyValue, ib, b"{".to_vec())
        .await
        .unwrap_err();
    assert_eq!(err.0, "invalid_request");
}

/// A tiny HTTP/1.1 server answering every request with `200 hello` and reporting the request
/// head it read.
async fn http_upstream() -> (u16, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Upstream: yes\r\nConnection: close\r\n\r\nhello")
                    .await;
            });
        }
    });
    (port, rx)
}

fn http_head(method: &str, uri: &str) -> HttpRequestHead {
    HttpRequestHead {
        method: method.into(),
        uri: uri.into(),
        authority: None,
        headers: vec![("x-request".into(), "42".into())],
        timeout_ms: Some(5_000),
    }
}

#[tokio::test]
async fn http_client_reaches_allowed_hosts_only() {
    let env = Env::start("httpc").await;
    let (_p, _) = env.provider("http-client", &[]).await;
    let (port, mut requests) = http_upstream().await;
    let g = env
        .grant(
            component("web"),
            Capability::HttpOutgoing,
            &[("allowed_hosts", "127.0.0.1")],
        )
        .await;
    let caller = ("w1", "web");
    let env = &env;
    let out = |head: HttpRequestHead, body: &[u8]| {
        let request = CapabilityRequest::Http(HttpMessage {
            head,
            body: Bytes::copy_from_slice(body),
        });
        async move {
            match env
                .call("http-client", caller, Some(g.seq), request, false)
                .await?
            {
                CapabilityResponse::Http(m) => Ok((m.head, m.body)),
                other => panic!("not an HTTP reply: {other:?}"),
            }
        }
    };

    let (head, body) = out(
        http_head("POST", &format!("http://127.0.0.1:{port}/path?q=1")),
        b"payload",
    )
    .await
    .unwrap();
    assert_eq!(&body[..], b"hello");
    assert_eq!(head.status, 200);
    assert!(
        head.headers
            .iter()
            .any(|(k, v)| k == "x-upstream" && v == "yes"),
        "{head:?}"
    );
    let seen = requests.recv().await.unwrap();
    assert!(seen.starts_with("POST /path?q=1 HTTP/1.1\r\n"), "{seen}");
    assert!(
        seen.to_ascii_lowercase().contains("x-request: 42"),
        "{seen}"
    );

    // A host not in the list, https, a port nobody listens on.
    let (code, message) = out(http_head("GET", "http://example.com/"), b"")
        .await
        .unwrap_err();
    assert_eq!(code, "access_denied");
    assert!(message.contains("example.com"), "{message}");
    let (code, message) = out(http_head("GET", "https://127.0.0.1/"), b"")
        .await
        .unwrap_err();
    assert_eq!(code, "upstream");
    assert!(message.contains("TLS"), "{message}");
    let closed = free_port();
    let (code, message) = out(
        http_head("GET", &format!("http://127.0.0.1:{closed}/")),
        b"",
    )
    .await
    .unwrap_err();
    assert_eq!(code, "upstream");
    assert_eq!(
        message.split_whitespace().next(),
        Some("connection_refused"),
        "{message}"
    );

    // No assignment: denied before anything leaves.
    let request = CapabilityRequest::Http(HttpMessage {
        head: http_head("GET", &format!("http://127.0.0.1:{port}/")),
        body: Bytes::new(),
    });
    let (code, _) = env
        .call("http-client", ("w2", "other"), None, request, false)
        .await
        .unwrap_err();
    assert_eq!(code, "access_denied");
}

#[tokio::test]
async fn messaging_publishes_by_pattern_and_delivers_subscriptions() {
    let env = Env::start("msg").await;
    let (_p, id) = env.provider("messaging", &[]).await;
    let g = env
        .grant(
            component("mc"),
            Capability::Messaging,
            &[("publish", "out.>"), ("subscribe", "in.jobs")],
        )
        .await;
    let caller = ("m1", "mc");
    let env = &env;
    let request = |r: &MessagingRequest| {
        let request = CapabilityRequest::Messaging(r.clone());
        async move {
            match env
                .call("messaging", caller, Some(g.seq), request, false)
                .await?
            {
                CapabilityResponse::Messaging(m) => Ok(m.message),
                other => panic!("not a messaging reply: {other:?}"),
            }
        }
    };

    // Publish: allowed by pattern, denied otherwise.
    let mut out = env.client.subscribe("out.x").await.unwrap();
    trellis_tests::settled(&env.client).await;
    request(&MessagingRequest::Publish {
        message: BrokerMessage {
            subject: "out.x".into(),
            body: Bytes::from_static(b"ping"),
            reply_to: None,
        },
    })
    .await
    .unwrap();
    let message = tokio::time::timeout(T, out.next()).await.unwrap().unwrap();
    assert_eq!(&message.payload[..], b"ping");
    let reserved = subject::ctl(&env.l, trellis_schemas::CtlOp::HostList);
    for subject in ["elsewhere.x", reserved.as_str(), "out.*"] {
        let (code, _) = request(&MessagingRequest::Publish {
            message: BrokerMessage {
                subject: subject.into(),
                body: Bytes::new(),
                reply_to: None,
            },
        })
        .await
        .unwrap_err();
        assert_eq!(code, "access_denied", "{subject}");
    }

    // Request: the reply comes back as a broker message; nobody listening is an upstream error.
    let mut service = env.client.subscribe("out.svc").await.unwrap();
    trellis_tests::settled(&env.client).await;
    let responder = env.client.clone();
    tokio::spawn(async move {
        if let Some(m) = service.next().await {
            let body = [b"re: ".as_slice(), &m.payload].concat();
            responder
                .publish(m.reply.unwrap(), body.into())
                .await
                .unwrap();
        }
    });
    let reply = request(&MessagingRequest::Request {
        subject: "out.svc".into(),
        body: Bytes::from_static(b"q"),
        timeout_ms: 5_000,
    })
    .await
    .unwrap();
    let reply = reply.expect("a reply message");
    assert_eq!(&reply.body[..], b"re: q");
    let (code, _) = request(&MessagingRequest::Request {
        subject: "out.nobody".into(),
        body: Bytes::new(),
        timeout_ms: 500,
    })
    .await
    .unwrap_err();
    assert_eq!(code, "upstream");

    // Subscriptions: a message on in.jobs reaches the component's handler export.
    let mut component_calls = env
        .client
        .subscribe(dataplane::component(
            &env.l,
            &ComponentName::new("mc").unwrap(),
            Op::Call,
        ))
        .await
        .unwrap();
    env.client.flush().await.unwrap();
    // Publishes `body` on in.jobs once; what the component is delivered within `wait`.
    async fn delivery(
        client: &async_nats::Client,
        calls: &mut async_nats::Subscriber,
        body: &'static [u8],
        wait: Duration,
    ) -> Option<async_nats::Message> {
        client.publish("in.jobs", body.into()).await.unwrap();
        tokio::time::timeout(wait, calls.next())
            .await
            .ok()
            .flatten()
    }
    // The provider subscribes once it has seen the grant: publish until a delivery arrives.
    let deadline = tokio::time::Instant::now() + T;
    let delivered = loop {
        assert!(tokio::time::Instant::now() < deadline, "no delivery");
        let job = b"job-1";
        let wait = Duration::from_millis(300);
        if let Some(m) = delivery(&env.client, &mut component_calls, job, wait).await {
            break m;
        }
    };
    let export = delivered
        .headers
        .as_ref()
        .and_then(|h| h.get(headers::EXPORT))
        .map(|v| v.as_str().to_owned());
    assert_eq!(
        export.as_deref(),
        Some("wasmcloud:messaging/handler@0.2.0#handle-message")
    );
    let args: Value = serde_json::from_slice(&delivered.payload).unwrap();
    assert_eq!(
        args,
        json!([{"subject": "in.jobs", "body": b"job-1".to_vec(), "reply-to": null}])
    );
    let mut ok = HeaderMap::new();
    ok.insert(headers::STATUS, "ok");
    env.client
        .publish_with_headers(
            delivered.reply.unwrap(),
            ok,
            br#"{"ok":null}"#.as_slice().into(),
        )
        .await
        .unwrap();

    // Revoked: no more deliveries.
    env.revoke(&g.assignment.assignment_id).await;
    env.wait_assignments("messaging", &id, 0).await;
    // The provider unsubscribes once it has applied the revocation: probes are delivered until
    // then, and none for a whole second after.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let quiet = Duration::from_secs(1);
    while delivery(&env.client, &mut component_calls, b"probe", quiet)
        .await
        .is_some()
    {
        assert!(tokio::time::Instant::now() < deadline, "still delivered");
    }
    env.client
        .publish("in.jobs", b"job-2".as_slice().into())
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(1), component_calls.next())
            .await
            .is_err(),
        "delivered after the revocation"
    );
}

/// `GET path` on 127.0.0.1:`port` with `Host: example.test`; returns (status, headers, body).
async fn http_get(port: u16, path: &str) -> Result<(u16, http::HeaderMap, String), String> {
    let request = http::Request::get(format!("http://127.0.0.1:{port}{path}"))
        .header(http::header::HOST, "example.test")
        .body(String::new())
        .map_err(|e| e.to_string())?;
    let reply = http_send(request, Duration::from_secs(20)).await?;
    Ok((reply.status, reply.headers, reply.body))
}

#[tokio::test]
async fn http_server_dispatches_to_the_component_and_maps_errors() {
    let env = Env::start("https").await;
    let (_p, id) = env.provider("http-server", &[]).await;
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let g = env
        .grant(
            component("web"),
            Capability::HttpIncoming,
            &[("address", &address)],
        )
        .await;

    // With nothing serving a component that was never pushed: 503, and the body says so
    // (the fake instance below is not a pushed component either).
    let (status, _, body) = wait_for("the listener", T, || async {
        http_get(port, "/").await.ok()
    })
    .await;
    assert_eq!(status, 503);
    assert!(
        body.starts_with("unknown_component: component web is not known"),
        "{body}"
    );

    // A fake instance of `web` in the component's queue group.
    let mut requests = env
        .client
        .queue_subscribe(
            dataplane::component(&env.l, &ComponentName::new("web").unwrap(), Op::Http),
            dataplane::component_queue(&ComponentName::new("web").unwrap()),
        )
        .await
        .unwrap();
    trellis_tests::settled(&env.client).await;
    let instance = env.client.clone();
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<HttpRequestHead>();
    let fake = tokio::spawn(async move {
        while let Some(m) = requests.next().await {
            let head: HttpRequestHead = serde_json::from_str(
                m.headers
                    .as_ref()
                    .unwrap()
                    .get(headers::HTTP_HEAD)
                    .unwrap()
                    .as_str(),
            )
            .unwrap();
            let mut headers = HeaderMap::new();
            if head.uri == "/crash" {
                headers.insert(headers::STATUS, "error");
                headers.insert(headers::ERROR_CODE, "crashed");
                instance
                    .publish_with_headers(m.reply.unwrap(), headers, "trap".into())
                    .await
                    .unwrap();
                continue;
            }
            let reply = HttpResponseHead {
                status: 201,
                headers: vec![("x-served-by".into(), "fake".into())],
            };
            headers.insert(headers::STATUS, "ok");
            headers.insert(
                headers::HTTP_HEAD,
                serde_json::to_string(&reply).unwrap().as_str(),
            );
            let body = format!("hi {}", head.uri);
            instance
                .publish_with_headers(m.reply.unwrap(), headers, body.into())
                .await
                .unwrap();
            let _ = seen_tx.send(head);
        }
    });

    let (status, headers, body) = http_get(port, "/hello?x=1").await.unwrap();
    assert_eq!(status, 201, "{headers:?}");
    assert_eq!(
        headers.get("x-served-by").and_then(|v| v.to_str().ok()),
        Some("fake"),
        "{headers:?}"
    );
    assert_eq!(body, "hi /hello?x=1");
    let request = seen.recv().await.unwrap();
    assert_eq!(request.method, "GET");
    assert_eq!(request.authority.as_deref(), Some("example.test"));
    let (status, _, body) = http_get(port, "/crash").await.unwrap();
    assert_eq!(status, 500);
    assert!(body.contains("crashed"), "{body}");

    // Keep-alive: two requests pipelined on one connection, written out by hand on purpose (an
    // HTTP client would not pipeline them).
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream
        .write_all(b"GET /one HTTP/1.1\r\nHost: h\r\n\r\nGET /two HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut both = String::new();
    stream.read_to_string(&mut both).await.unwrap();
    assert!(
        both.contains("hi /one") && both.contains("hi /two"),
        "{both}"
    );

    // A second assignment on the same address is refused and does not disturb the first.
    let second = env
        .grant(
            component("web2"),
            Capability::HttpIncoming,
            &[("address", &address)],
        )
        .await;
    env.wait_assignments("http-server", &id, 2).await;
    let (status, _, _) = http_get(port, "/still").await.unwrap();
    assert_eq!(status, 201);
    env.revoke(&second.assignment.assignment_id).await;

    // Revoked: the listener closes.
    env.revoke(&g.assignment.assignment_id).await;
    wait_for("the listener to close", T, || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
            .then_some(())
    })
    .await;
    fake.abort();
}

#[tokio::test]
async fn providers_announce_themselves_and_stop_on_request_or_signal() {
    let env = Env::start("plife").await;
    let (mut first, id) = env
        .provider("kv", &["--host-id", "h1", "--config", "mode=fast"])
        .await;
    let started = env
        .nats
        .facts(&env.l)
        .await
        .into_iter()
        .find_map(|f| match f.event.data {
            FactData::ProviderStarted(d) if d.provider_id == id => Some(d),
            _ => None,
        })
        .unwrap();
    assert_eq!(started.capabilities, vec![Capability::KeyValue]);
    assert_eq!(started.host_id.as_ref().map(|h| h.as_str()), Some("h1"));
    assert_eq!(started.version, trellis_schemas::VERSION);
    assert!(!started.node.is_empty());

    assert_eq!(
        env.control("kv", &id, ProviderVerb::Config).await,
        json!({"mode": "fast"})
    );
    let health = env.control("kv", &id, ProviderVerb::Health).await;
    assert_eq!(health["name"], "kv");
    assert_eq!(health["provider_id"], id.as_str());

    // `stop` on the control subject: acknowledged, drained, recorded, exit 0.
    assert_eq!(env.control("kv", &id, ProviderVerb::Stop).await, json!({}));
    assert_eq!(first.wait_exit(T).await, Some(0), "{}", first.log());
    let stopped = |id: ProviderId| {
        let env = &env;
        async move {
            env.nats
                .facts(&env.l)
                .await
                .into_iter()
                .find_map(|f| match f.event.data {
                    FactData::ProviderStopped(d) if d.provider_id == id => Some(d.reason),
                    _ => None,
                })
        }
    };
    assert_eq!(stopped(id.clone()).await.as_deref(), Some("requested"));

    // SIGTERM: the same drain.
    let (mut second, id2) = env.provider("kv", &[]).await;
    second.signal(Signal::SIGTERM);
    assert_eq!(second.wait_exit(T).await, Some(0), "{}", second.log());
    assert_eq!(stopped(id2).await.as_deref(), Some("signal: SIGTERM"));
}

#[tokio::test]
async fn a_draining_provider_answers_the_calls_it_took() {
    let env = Env::start("pdrain").await;
    let (mut provider, id) = env.provider("http-client", &[]).await;
    // An upstream that takes a second to answer.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nslow",
                    )
                    .await;
            });
        }
    });
    let g = env
        .grant(
            component("web"),
            Capability::HttpOutgoing,
            &[("allowed_hosts", "127.0.0.1")],
        )
        .await;
    let request = CapabilityRequest::Http(HttpMessage {
        head: http_head("GET", &format!("http://127.0.0.1:{port}/")),
        body: Bytes::new(),
    });
    let call = env.call("http-client", ("w1", "web"), Some(g.seq), request, false);
    let stop = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        provider.signal(Signal::SIGTERM);
    };
    let (reply, ()) = tokio::join!(call, stop);
    let CapabilityResponse::Http(reply) = reply.unwrap() else {
        panic!("not an HTTP reply")
    };
    assert_eq!(&reply.body[..], b"slow");
    assert_eq!(provider.wait_exit(T).await, Some(0), "{}", provider.log());
    let reason = env
        .nats
        .facts(&env.l)
        .await
        .into_iter()
        .find_map(|f| match f.event.data {
            FactData::ProviderStopped(d) if d.provider_id == id => Some(d.reason),
            _ => None,
        });
    assert_eq!(reason.as_deref(), Some("signal: SIGTERM"));
}

/// The replica count of a stream.
async fn replicas_of(js: &async_nats::jetstream::Context, stream: &str) -> usize {
    let mut handle = js.get_stream(stream).await.unwrap();
    handle.info().await.unwrap().config.num_replicas
}

#[tokio::test]
async fn a_three_server_cluster_gets_three_replicas_of_everything_trellis_keeps() {
    let mut servers = Nats::cluster(3).await;
    let l = lattice("r3");
    let js = async_nats::jetstream::new(servers[1].client().await);
    let events = subject::events_stream(&l);
    let heartbeats = subject::heartbeat_stream(&l);
    // What an earlier process created with one replica, as before the cluster grew: the fact
    // streams and a bucket's stream.
    let one = trellis_bus::StreamSettings {
        replicas: Some(1),
        ..Default::default()
    };
    trellis_bus::ensure_streams(&js, &l, &one).await.unwrap();
    assert_eq!(replicas_of(&js, &events).await, 1);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "KV_old".into(),
        subjects: vec!["$KV.old.>".into()],
        max_messages_per_subject: 1,
        allow_rollup: true,
        allow_direct: true,
        num_replicas: 1,
        ..Default::default()
    })
    .await
    .unwrap();

    // The controller, told nothing, sees a cluster of three and raises the streams to three.
    let env = Env::on(servers.remove(0), "r3").await;
    for stream in [&events, &heartbeats] {
        assert_eq!(replicas_of(&js, stream).await, 3, "{stream}");
    }
    // The kv provider raises the old bucket's stream and creates a new one with three.
    let (_kv, _) = env.provider("kv", &[]).await;
    for (component_name, bucket) in [("cold", "old"), ("cfresh", "fresh")] {
        let grant = env
            .grant(
                component(component_name),
                Capability::KeyValue,
                &[("bucket", bucket)],
            )
            .await;
        let caller = ("i-".to_owned() + component_name, component_name);
        // While JetStream moves a bucket to its new replicas, writes may briefly answer
        // `unavailable` (the documented transient code); they succeed once it has.
        wait_for(&format!("a write to bucket {bucket}"), T, || async {
            env.kv(
                (caller.0.as_str(), caller.1),
                Some(grant.seq),
                &set("k", b"v"),
            )
            .await
            .map_err(|(code, message)| {
                assert_eq!(code, "unavailable", "{message}");
            })
            .ok()
        })
        .await;
        assert_eq!(
            replicas_of(&js, &format!("KV_{bucket}")).await,
            3,
            "bucket {bucket}"
        );
    }
    // The artifact store, created on the first push.
    trellis_bus::put_artifact(&js, &l, b"not really wasm")
        .await
        .unwrap();
    assert_eq!(
        replicas_of(&js, &format!("OBJ_{}", subject::artifact_bucket(&l))).await,
        3
    );

    // An explicit count wins, in both directions: an operator may lower it again.
    trellis_bus::ensure_streams(&js, &l, &one).await.unwrap();
    assert_eq!(replicas_of(&js, &events).await, 1);
    drop(servers);
}
