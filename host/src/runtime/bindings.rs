//! Host implementations of the capability interfaces of the `trellis:lattice/host` world
//! (`wit/trellis.wit`): `wasi:keyvalue` (store, atomics, batch), Spin's
//! `fermyon:spin/key-value` (on the same buckets), `wasi:logging`,
//! `wasmcloud:messaging/consumer` and `wasmcloud:bus/lattice` (link names). `wasi:http` comes from wasmtime-wasi-http (see
//! [`super::http`]).
//!
//! Key-value and messaging calls become the typed requests of
//! [`trellis_schemas::capability::rpc`] and are handed to the invocation's
//! [`CapabilityBridge`](super::CapabilityBridge) as they are (the bridge encodes them only if
//! they cross NATS); logging writes to the captured stderr.

use bytes::Bytes;
use trellis_schemas::capability::rpc::{
    BrokerMessage as WireMessage, CapabilityRequest, CapabilityResponse, KvReply, KvRequest,
    MessagingRequest,
};
use wasmtime::component::{HasSelf, Linker, Resource};

use super::capabilities::{CapabilityCall, CapabilityError};
use super::store::StoreState;

#[allow(
    missing_docs,
    missing_debug_implementations,
    unused_qualifications,
    reason = "bindgen-generated code"
)]
mod generated {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "trellis:lattice/host",
        imports: { default: async | trappable },
        with: {
            "wasi:http": wasmtime_wasi_http::p2::bindings::http,
            "wasi:io": wasmtime_wasi::p2::bindings::io,
            "wasi:keyvalue/store.bucket": super::KvBucket,
            "fermyon:spin/key-value.store": super::SpinStore,
            "wasmcloud:bus/lattice.call-target-interface": super::CallTarget,
        },
        require_store_data_send: true,
    });
}

use generated::fermyon::spin::key_value as spin_kv;
use generated::wasi::keyvalue::{atomics, batch, store};
use generated::wasi::logging::logging;
use generated::wasmcloud::bus::lattice;
use generated::wasmcloud::messaging::{consumer, types as msg_types};

/// An open key-value bucket: the identifier the guest passed to `open`. The provider resolves it
/// against the assignment on every call.
#[derive(Debug)]
pub struct KvBucket {
    identifier: String,
}

/// An open Spin key-value store: the bucket it stands for (`""`, the assigned bucket, for the
/// store labelled `default`).
#[derive(Debug)]
pub struct SpinStore {
    bucket: String,
}

/// An interface a wasmCloud component names in `set-link-name`.
#[derive(Debug)]
pub struct CallTarget {
    interface: String,
}

/// The one link name Trellis knows: the assignment of each capability.
const DEFAULT_LINK_NAME: &str = "default";

/// The label of Spin's default store, which is the bucket the assignment names.
const SPIN_DEFAULT_STORE: &str = "default";

/// Links the capability interfaces into `linker`.
pub(crate) fn add_to_linker(linker: &mut Linker<StoreState>) -> wasmtime::Result<()> {
    store::add_to_linker::<StoreState, HasSelf<StoreState>>(linker, |s| s)?;
    atomics::add_to_linker::<StoreState, HasSelf<StoreState>>(linker, |s| s)?;
    batch::add_to_linker::<StoreState, HasSelf<StoreState>>(linker, |s| s)?;
    spin_kv::add_to_linker::<StoreState, HasSelf<StoreState>>(linker, |s| s)?;
    lattice::add_to_linker::<StoreState, HasSelf<StoreState>>(linker, |s| s)?;
    logging::add_to_linker::<StoreState, HasSelf<StoreState>>(linker, |s| s)?;
    consumer::add_to_linker::<StoreState, HasSelf<StoreState>>(linker, |s| s)?;
    msg_types::add_to_linker::<StoreState, HasSelf<StoreState>>(linker, |s| s)?;
    Ok(())
}

fn kv_error(e: CapabilityError) -> store::Error {
    match e {
        CapabilityError::Denied(m) => {
            tracing::debug!(reason = %m, "key-value access denied");
            store::Error::AccessDenied
        }
        CapabilityError::NoSuchStore(_) => store::Error::NoSuchStore,
        other => store::Error::Other(other.to_string()),
    }
}

impl StoreState {
    async fn capability(
        &mut self,
        request: CapabilityRequest,
    ) -> Result<CapabilityResponse, CapabilityError> {
        let call = CapabilityCall {
            request,
            timeout: self.call_budget(),
            traceparent: self.traceparent.clone(),
        };
        self.bridge.call(call).await
    }

    async fn kv(&mut self, request: KvRequest) -> Result<KvReply, store::Error> {
        match self
            .capability(CapabilityRequest::KeyValue(request))
            .await
            .map_err(kv_error)?
        {
            CapabilityResponse::KeyValue(reply) => Ok(reply),
            _ => Err(store::Error::Other(
                "the kv provider answered another capability's reply".to_owned(),
            )),
        }
    }

    async fn messaging(
        &mut self,
        request: MessagingRequest,
    ) -> Result<Option<WireMessage>, String> {
        match self
            .capability(CapabilityRequest::Messaging(request))
            .await
            .map_err(|e| e.to_string())?
        {
            CapabilityResponse::Messaging(reply) => Ok(reply.message),
            _ => Err("the messaging provider answered another capability's reply".to_owned()),
        }
    }

    fn identifier(&self, bucket: &Resource<KvBucket>) -> wasmtime::Result<String> {
        Ok(self.table.get(bucket)?.identifier.clone())
    }

    // The single-key operations both key-value interfaces make (`wasi:keyvalue/store` and
    // Spin's), on a bucket by name.

    async fn kv_get(
        &mut self,
        bucket: String,
        key: String,
    ) -> Result<Option<Vec<u8>>, store::Error> {
        self.kv(KvRequest::Get { bucket, key })
            .await
            .map(|r| r.value.map(Vec::from))
    }

    async fn kv_set(
        &mut self,
        bucket: String,
        key: String,
        value: Vec<u8>,
    ) -> Result<(), store::Error> {
        let value = Bytes::from(value);
        self.kv(KvRequest::Set { bucket, key, value })
            .await
            .map(|_| ())
    }

    async fn kv_delete(&mut self, bucket: String, key: String) -> Result<(), store::Error> {
        self.kv(KvRequest::Delete { bucket, key }).await.map(|_| ())
    }

    async fn kv_exists(&mut self, bucket: String, key: String) -> Result<bool, store::Error> {
        self.kv(KvRequest::Exists { bucket, key })
            .await
            .map(|r| r.exists.unwrap_or(false))
    }
}

impl store::Host for StoreState {
    async fn open(
        &mut self,
        identifier: String,
    ) -> wasmtime::Result<Result<Resource<KvBucket>, store::Error>> {
        if let Err(e) = self
            .kv(KvRequest::Open {
                bucket: identifier.clone(),
            })
            .await
        {
            return Ok(Err(e));
        }
        Ok(Ok(self.table.push(KvBucket { identifier })?))
    }
}

impl store::HostBucket for StoreState {
    async fn get(
        &mut self,
        bucket: Resource<KvBucket>,
        key: String,
    ) -> wasmtime::Result<Result<Option<Vec<u8>>, store::Error>> {
        let bucket = self.identifier(&bucket)?;
        Ok(self.kv_get(bucket, key).await)
    }

    async fn set(
        &mut self,
        bucket: Resource<KvBucket>,
        key: String,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), store::Error>> {
        let bucket = self.identifier(&bucket)?;
        Ok(self.kv_set(bucket, key, value).await)
    }

    async fn delete(
        &mut self,
        bucket: Resource<KvBucket>,
        key: String,
    ) -> wasmtime::Result<Result<(), store::Error>> {
        let bucket = self.identifier(&bucket)?;
        Ok(self.kv_delete(bucket, key).await)
    }

    async fn exists(
        &mut self,
        bucket: Resource<KvBucket>,
        key: String,
    ) -> wasmtime::Result<Result<bool, store::Error>> {
        let bucket = self.identifier(&bucket)?;
        Ok(self.kv_exists(bucket, key).await)
    }

    async fn list_keys(
        &mut self,
        bucket: Resource<KvBucket>,
        cursor: Option<u64>,
    ) -> wasmtime::Result<Result<store::KeyResponse, store::Error>> {
        let bucket = self.identifier(&bucket)?;
        Ok(self
            .kv(KvRequest::ListKeys { bucket, cursor })
            .await
            .map(|r| store::KeyResponse {
                keys: r.keys,
                cursor: r.cursor,
            }))
    }

    async fn drop(&mut self, bucket: Resource<KvBucket>) -> wasmtime::Result<()> {
        self.table.delete(bucket)?;
        Ok(())
    }
}

impl atomics::Host for StoreState {
    async fn increment(
        &mut self,
        bucket: Resource<KvBucket>,
        key: String,
        delta: u64,
    ) -> wasmtime::Result<Result<u64, store::Error>> {
        let bucket = self.identifier(&bucket)?;
        Ok(self
            .kv(KvRequest::Increment { bucket, key, delta })
            .await
            .and_then(|r| {
                r.number.ok_or_else(|| {
                    store::Error::Other("the kv provider's reply has no number".to_owned())
                })
            }))
    }
}

impl batch::Host for StoreState {
    async fn get_many(
        &mut self,
        bucket: Resource<KvBucket>,
        keys: Vec<String>,
    ) -> wasmtime::Result<Result<Vec<Option<(String, Vec<u8>)>>, store::Error>> {
        let bucket = self.identifier(&bucket)?;
        let reply = match self
            .kv(KvRequest::GetMany {
                bucket,
                keys: keys.clone(),
            })
            .await
        {
            Ok(reply) => reply,
            Err(e) => return Ok(Err(e)),
        };
        if reply.values.len() != keys.len() {
            return Ok(Err(store::Error::Other(format!(
                "the kv provider answered {} values for {} keys",
                reply.values.len(),
                keys.len()
            ))));
        }
        Ok(Ok(keys
            .into_iter()
            .zip(reply.values)
            .map(|(k, v)| v.map(|v| (k, Vec::from(v))))
            .collect()))
    }

    async fn set_many(
        &mut self,
        bucket: Resource<KvBucket>,
        key_values: Vec<(String, Vec<u8>)>,
    ) -> wasmtime::Result<Result<(), store::Error>> {
        let bucket = self.identifier(&bucket)?;
        let pairs = key_values
            .into_iter()
            .map(|(k, v)| (k, Bytes::from(v)))
            .collect();
        Ok(self
            .kv(KvRequest::SetMany { bucket, pairs })
            .await
            .map(|_| ()))
    }

    async fn delete_many(
        &mut self,
        bucket: Resource<KvBucket>,
        keys: Vec<String>,
    ) -> wasmtime::Result<Result<(), store::Error>> {
        let bucket = self.identifier(&bucket)?;
        Ok(self
            .kv(KvRequest::DeleteMany { bucket, keys })
            .await
            .map(|_| ()))
    }
}

fn spin_error(e: store::Error) -> spin_kv::Error {
    match e {
        store::Error::AccessDenied => spin_kv::Error::AccessDenied,
        store::Error::NoSuchStore => spin_kv::Error::NoSuchStore,
        store::Error::Other(message) => spin_kv::Error::Other(message),
    }
}

/// The most keys `get-keys` gathers: the interface returns them all at once, and the guest's
/// memory limit would end an invocation that got more long before.
const SPIN_MAX_KEYS: usize = 100_000;

impl StoreState {
    fn spin_bucket(&self, store: &Resource<SpinStore>) -> wasmtime::Result<String> {
        Ok(self.table.get(store)?.bucket.clone())
    }
}

impl spin_kv::Host for StoreState {}

impl spin_kv::HostStore for StoreState {
    async fn open(
        &mut self,
        label: String,
    ) -> wasmtime::Result<Result<Resource<SpinStore>, spin_kv::Error>> {
        // `default` is the assigned bucket; any other label names a bucket, which the provider
        // refuses unless the assignment names it.
        let bucket = if label == SPIN_DEFAULT_STORE {
            String::new()
        } else {
            label
        };
        if let Err(e) = self
            .kv(KvRequest::Open {
                bucket: bucket.clone(),
            })
            .await
        {
            return Ok(Err(spin_error(e)));
        }
        Ok(Ok(self.table.push(SpinStore { bucket })?))
    }

    async fn get(
        &mut self,
        store: Resource<SpinStore>,
        key: String,
    ) -> wasmtime::Result<Result<Option<Vec<u8>>, spin_kv::Error>> {
        let bucket = self.spin_bucket(&store)?;
        Ok(self.kv_get(bucket, key).await.map_err(spin_error))
    }

    async fn set(
        &mut self,
        store: Resource<SpinStore>,
        key: String,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), spin_kv::Error>> {
        let bucket = self.spin_bucket(&store)?;
        Ok(self.kv_set(bucket, key, value).await.map_err(spin_error))
    }

    async fn delete(
        &mut self,
        store: Resource<SpinStore>,
        key: String,
    ) -> wasmtime::Result<Result<(), spin_kv::Error>> {
        let bucket = self.spin_bucket(&store)?;
        Ok(self.kv_delete(bucket, key).await.map_err(spin_error))
    }

    async fn exists(
        &mut self,
        store: Resource<SpinStore>,
        key: String,
    ) -> wasmtime::Result<Result<bool, spin_kv::Error>> {
        let bucket = self.spin_bucket(&store)?;
        Ok(self.kv_exists(bucket, key).await.map_err(spin_error))
    }

    async fn get_keys(
        &mut self,
        store: Resource<SpinStore>,
    ) -> wasmtime::Result<Result<Vec<String>, spin_kv::Error>> {
        let bucket = self.spin_bucket(&store)?;
        let mut keys = Vec::new();
        let mut cursor = None;
        loop {
            let page = match self
                .kv(KvRequest::ListKeys {
                    bucket: bucket.clone(),
                    cursor,
                })
                .await
            {
                Ok(page) => page,
                Err(e) => return Ok(Err(spin_error(e))),
            };
            keys.extend(page.keys);
            if keys.len() > SPIN_MAX_KEYS {
                return Ok(Err(spin_kv::Error::Other(format!(
                    "the store holds more than {SPIN_MAX_KEYS} keys; list them with wasi:keyvalue's cursor"
                ))));
            }
            match page.cursor {
                // A cursor that does not move would never end.
                Some(next) if Some(next) != cursor => cursor = Some(next),
                _ => return Ok(Ok(keys)),
            }
        }
    }

    async fn drop(&mut self, store: Resource<SpinStore>) -> wasmtime::Result<()> {
        self.table.delete(store)?;
        Ok(())
    }
}

impl lattice::Host for StoreState {
    async fn set_link_name(
        &mut self,
        name: String,
        interfaces: Vec<Resource<CallTarget>>,
    ) -> wasmtime::Result<Result<(), String>> {
        let mut named = Vec::with_capacity(interfaces.len());
        for target in interfaces {
            named.push(self.table.delete(target)?.interface);
        }
        if name == DEFAULT_LINK_NAME {
            return Ok(Ok(()));
        }
        Ok(Err(format!(
            "no link named {name:?} for {}: Trellis grants one assignment per capability, selected by the link name \"{DEFAULT_LINK_NAME}\"",
            named.join(", ")
        )))
    }
}

impl lattice::HostCallTargetInterface for StoreState {
    async fn new(
        &mut self,
        namespace: String,
        package: String,
        interface: String,
    ) -> wasmtime::Result<Resource<CallTarget>> {
        let interface = format!("{namespace}:{package}/{interface}");
        Ok(self.table.push(CallTarget { interface })?)
    }

    async fn drop(&mut self, target: Resource<CallTarget>) -> wasmtime::Result<()> {
        self.table.delete(target)?;
        Ok(())
    }
}

impl logging::Host for StoreState {
    async fn log(
        &mut self,
        level: logging::Level,
        context: String,
        message: String,
    ) -> wasmtime::Result<()> {
        let level = match level {
            logging::Level::Trace => "trace",
            logging::Level::Debug => "debug",
            logging::Level::Info => "info",
            logging::Level::Warn => "warn",
            logging::Level::Error => "error",
            logging::Level::Critical => "critical",
        };
        StoreState::log(self, level, &context, &message);
        Ok(())
    }
}

impl msg_types::Host for StoreState {}

fn to_wire(msg: msg_types::BrokerMessage) -> WireMessage {
    WireMessage {
        subject: msg.subject,
        body: Bytes::from(msg.body),
        reply_to: msg.reply_to,
    }
}

impl consumer::Host for StoreState {
    async fn request(
        &mut self,
        subject: String,
        body: Vec<u8>,
        timeout_ms: u32,
    ) -> wasmtime::Result<Result<msg_types::BrokerMessage, String>> {
        let request = MessagingRequest::Request {
            subject,
            body: Bytes::from(body),
            timeout_ms,
        };
        Ok(self.messaging(request).await.and_then(|reply| {
            reply
                .map(|m| msg_types::BrokerMessage {
                    subject: m.subject,
                    body: Vec::from(m.body),
                    reply_to: m.reply_to,
                })
                .ok_or_else(|| "the messaging provider sent no reply message".to_owned())
        }))
    }

    async fn publish(
        &mut self,
        msg: msg_types::BrokerMessage,
    ) -> wasmtime::Result<Result<(), String>> {
        let request = MessagingRequest::Publish {
            message: to_wire(msg),
        };
        Ok(self.messaging(request).await.map(|_| ()))
    }
}
