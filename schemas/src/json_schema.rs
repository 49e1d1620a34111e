//! JSON Schemas for every control message and fact payload, generated from the Rust types.
//!
//! The checked-in copies live in `schemas/json/`; a test fails when they drift from the types.
//! Regenerate them with `TRELLIS_BLESS=1 cargo test -p trellis-schemas json_schemas`.

use schemars::{JsonSchema, schema_for};

use crate::capability::rpc::{HttpRequestHead, HttpResponseHead};
use crate::control::CtlOp;
use crate::fact::{CloudEventEnvelope, FactKind};
use crate::heartbeat::Heartbeat;
use crate::instance::{
    InstanceStatsCommand, InstanceStatsReply, StartInstanceCommand, StartProviderCommand,
    StopInstanceCommand, StopProviderCommand,
};

/// One generated schema and the file it belongs in.
#[derive(Debug, Clone)]
pub struct NamedSchema {
    /// File name inside `schemas/json/`.
    pub file: String,
    /// The schema.
    pub schema: serde_json::Value,
}

/// The JSON Schema of `T` as a JSON value.
pub(crate) fn schema_of<T: JsonSchema>() -> serde_json::Value {
    serde_json::to_value(schema_for!(T)).unwrap_or(serde_json::Value::Null)
}

fn named<T: JsonSchema>(file: String) -> NamedSchema {
    NamedSchema {
        file,
        schema: schema_of::<T>(),
    }
}

/// The file name of the request schema of `op`.
pub fn request_file(op: CtlOp) -> String {
    format!("ctl.{}.request.schema.json", op.name())
}

/// The file name of the reply schema of `op`.
pub fn reply_file(op: CtlOp) -> String {
    format!("ctl.{}.reply.schema.json", op.name())
}

/// The file name of the payload schema of a fact kind.
pub fn fact_file(kind: FactKind) -> String {
    format!("fact.{}.schema.json", kind.short_name())
}

/// Every schema Trellis publishes.
pub fn all() -> Vec<NamedSchema> {
    let mut out = Vec::new();
    for op in CtlOp::ALL {
        out.push(NamedSchema {
            file: request_file(*op),
            schema: op.request_schema(),
        });
        out.push(NamedSchema {
            file: reply_file(*op),
            schema: op.reply_schema(),
        });
    }
    for kind in FactKind::ALL {
        out.push(NamedSchema {
            file: fact_file(*kind),
            schema: kind.payload_schema(),
        });
    }
    out.push(named::<CloudEventEnvelope>(
        "cloudevent.schema.json".to_owned(),
    ));
    out.push(named::<Heartbeat>("heartbeat.schema.json".to_owned()));
    out.push(named::<StartInstanceCommand>(
        "host.instance.start.schema.json".to_owned(),
    ));
    out.push(named::<StopInstanceCommand>(
        "host.instance.stop.schema.json".to_owned(),
    ));
    out.push(named::<InstanceStatsCommand>(
        "host.instance.stats.schema.json".to_owned(),
    ));
    out.push(named::<InstanceStatsReply>(
        "host.instance.stats.reply.schema.json".to_owned(),
    ));
    out.push(named::<crate::logs::InstanceLogsCommand>(
        "host.instance.logs.schema.json".to_owned(),
    ));
    out.push(named::<crate::logs::InstanceLogsReply>(
        "host.instance.logs.reply.schema.json".to_owned(),
    ));
    out.push(named::<crate::logs::LogRecord>(
        "log.record.schema.json".to_owned(),
    ));
    out.push(named::<StartProviderCommand>(
        "host.provider.start.schema.json".to_owned(),
    ));
    out.push(named::<StopProviderCommand>(
        "host.provider.stop.schema.json".to_owned(),
    ));
    out.push(named::<HttpRequestHead>(
        "rpc.http.request-head.schema.json".to_owned(),
    ));
    out.push(named::<HttpResponseHead>(
        "rpc.http.response-head.schema.json".to_owned(),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fact::HostStopped;
    use std::path::PathBuf;

    fn dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("json")
    }

    fn render(schema: &serde_json::Value) -> String {
        let mut s = serde_json::to_string_pretty(schema).expect("serializes");
        s.push('\n');
        s
    }

    /// Fails when `schemas/json/` differs from the types. `TRELLIS_BLESS=1` rewrites the files.
    #[test]
    fn json_schemas_match_the_types() {
        let bless = std::env::var_os("TRELLIS_BLESS").is_some();
        let schemas = all();
        let mut stale = Vec::new();
        for s in &schemas {
            let path = dir().join(&s.file);
            let want = render(&s.schema);
            let have = std::fs::read_to_string(&path).unwrap_or_default();
            if have != want {
                if bless {
                    std::fs::write(&path, want).expect("writes schema");
                } else {
                    stale.push(s.file.clone());
                }
            }
        }
        let expected: std::collections::BTreeSet<String> =
            schemas.iter().map(|s| s.file.clone()).collect();
        for entry in std::fs::read_dir(dir()).expect("schemas/json exists") {
            let name = entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned();
            if name.ends_with(".schema.json") && !expected.contains(&name) {
                if bless {
                    std::fs::remove_file(dir().join(&name)).expect("removes stale schema");
                } else {
                    stale.push(format!("{name} (no longer generated)"));
                }
            }
        }
        assert!(
            stale.is_empty(),
            "schemas/json is out of date: {stale:?}; run TRELLIS_BLESS=1 cargo test -p trellis-schemas json_schemas"
        );
    }

    fn validator(file: &str) -> jsonschema::Validator {
        let schema = all()
            .into_iter()
            .find(|s| s.file == file)
            .expect("schema exists")
            .schema;
        jsonschema::validator_for(&schema).expect("schema compiles")
    }

    #[test]
    fn encoded_facts_validate_against_their_schemas() {
        let data = crate::fact::FactData::HostStopped(HostStopped {
            host_id: crate::HostId::new("h1").expect("valid"),
            reason: "test".to_owned(),
        });
        let event = crate::fact::Event::new("/trellis/default/host/h1", data);
        let json: serde_json::Value =
            serde_json::from_slice(&event.encode().expect("encodes")).expect("json");
        let envelope = validator("cloudevent.schema.json");
        assert!(
            envelope.is_valid(&json),
            "{:?}",
            envelope.iter_errors(&json).next()
        );
        assert!(validator(&fact_file(FactKind::HostStopped)).is_valid(&json["data"]));
        assert!(!validator(&fact_file(FactKind::HostStarted)).is_valid(&json["data"]));
    }

    #[test]
    fn request_schemas_reject_unknown_fields() {
        let v = validator(&request_file(CtlOp::HostGet));
        assert!(v.is_valid(&serde_json::json!({"host_id": "h1"})));
        assert!(!v.is_valid(&serde_json::json!({"host_id": "h1", "nope": 1})));
        assert!(!v.is_valid(&serde_json::json!({"host_id": "h.1"})));
    }
}
