//! Drives every `wasi:keyvalue` call (store, atomics, batch) and `wasi:logging`, one exported
//! function per call. Keyvalue errors come back as stable strings: `access-denied`,
//! `no-such-store` or `other: <message>`.

wit_bindgen::generate!({
    world: "trellis:test-capabilities/kv-probe",
    path: ["../../../wit", "../wit-capabilities"],
    // The interfaces come from the vendored packages in `wit/deps`.
    generate_all,
});

use wasi::keyvalue::store::{self, Bucket};
use wasi::keyvalue::{atomics, batch};
use wasi::logging::logging::{self, Level};

struct KvProbe;

/// The stable text of a keyvalue error.
fn describe(error: store::Error) -> String {
    match error {
        store::Error::AccessDenied => "access-denied".to_owned(),
        store::Error::NoSuchStore => "no-such-store".to_owned(),
        store::Error::Other(message) => format!("other: {message}"),
    }
}

fn open(bucket: &str) -> Result<Bucket, String> {
    store::open(bucket).map_err(describe)
}

fn text(bytes: Vec<u8>) -> String {
    String::from_utf8_lossy(&bytes).into_owned()
}

impl Guest for KvProbe {
    fn round_trips(bucket: String, prefix: String, n: u32) -> Result<u32, String> {
        let bucket = open(&bucket)?;
        for i in 0..n {
            let key = format!("{prefix}-{}", i % 16);
            let value = i.to_le_bytes();
            bucket.set(&key, &value).map_err(describe)?;
            let read = bucket.get(&key).map_err(describe)?;
            if read.as_deref() != Some(&value[..]) {
                return Err(format!("{key}: read {read:?} after setting {value:?}"));
            }
        }
        Ok(n)
    }

    fn get(bucket: String, key: String) -> Result<Option<String>, String> {
        let value = open(&bucket)?.get(&key).map_err(describe)?;
        Ok(value.map(text))
    }

    fn set(bucket: String, key: String, value: String) -> Result<(), String> {
        open(&bucket)?.set(&key, value.as_bytes()).map_err(describe)
    }

    fn delete(bucket: String, key: String) -> Result<(), String> {
        open(&bucket)?.delete(&key).map_err(describe)
    }

    fn exists(bucket: String, key: String) -> Result<bool, String> {
        open(&bucket)?.exists(&key).map_err(describe)
    }

    fn list_keys(bucket: String) -> Result<Vec<String>, String> {
        let bucket = open(&bucket)?;
        let mut keys = Vec::new();
        let mut cursor = None;
        loop {
            let page = bucket.list_keys(cursor).map_err(describe)?;
            keys.extend(page.keys);
            match page.cursor {
                // A cursor that does not move would loop forever: stop instead.
                Some(next) if Some(next) != cursor => cursor = Some(next),
                _ => break,
            }
        }
        keys.sort();
        Ok(keys)
    }

    fn increment(bucket: String, key: String, delta: u64) -> Result<u64, String> {
        atomics::increment(&open(&bucket)?, &key, delta).map_err(describe)
    }

    fn set_many(bucket: String, pairs: Vec<(String, String)>) -> Result<(), String> {
        let pairs: Vec<(String, Vec<u8>)> = pairs
            .into_iter()
            .map(|(key, value)| (key, value.into_bytes()))
            .collect();
        batch::set_many(&open(&bucket)?, &pairs).map_err(describe)
    }

    fn get_many(bucket: String, keys: Vec<String>) -> Result<Vec<Option<String>>, String> {
        let values = batch::get_many(&open(&bucket)?, &keys).map_err(describe)?;
        Ok(values
            .into_iter()
            .map(|entry| entry.map(|(_, value)| text(value)))
            .collect())
    }

    fn log(level: String, message: String) {
        let level = match level.as_str() {
            "trace" => Level::Trace,
            "debug" => Level::Debug,
            "warn" => Level::Warn,
            "error" => Level::Error,
            "critical" => Level::Critical,
            _ => Level::Info,
        };
        logging::log(level, "kv-probe", &message);
    }
}

export!(KvProbe);
