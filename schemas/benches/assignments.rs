//! The lookup every capability call makes, in the host and again in the provider: the assignment
//! that grants a capability to an instance, among every assignment of the lattice. Run in
//! release:
//!
//! ```text
//! cargo bench -p trellis-schemas --bench assignments
//! ```
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    reason = "benchmark harness"
)]

use std::collections::BTreeMap;
use std::hint::black_box;

use chrono::{TimeZone, Utc};
use criterion::{Criterion, criterion_group, criterion_main};
use trellis_schemas::{
    Assignment, AssignmentId, AssignmentTarget, Capability, ComponentName, Event, Fact, FactData,
    InstanceId, Projection, ProviderName, apply,
};

/// A projection with `n` components, each granted key-value and messaging.
fn lattice(n: usize) -> Projection {
    let mut projection = Projection::new();
    let mut seq = 0;
    for c in 0..n {
        for capability in [Capability::KeyValue, Capability::Messaging] {
            seq += 1;
            let mut event = Event::new(
                "/trellis/bench/controller/c1",
                FactData::AssignmentGranted(Assignment {
                    assignment_id: AssignmentId::new(format!("a{seq:06}")).unwrap(),
                    target: AssignmentTarget::Component(
                        ComponentName::new(format!("component-{c}")).unwrap(),
                    ),
                    capability,
                    provider: ProviderName::new("kv").unwrap(),
                    config: BTreeMap::from([("bucket".to_owned(), format!("b{c}"))]),
                }),
            );
            event.time = Utc.timestamp_opt(1_700_000_000, 0).single().unwrap();
            apply(&mut projection, &Fact { seq, event });
        }
    }
    projection
}

fn lookups(c: &mut Criterion) {
    let instance = InstanceId::new("01KBX4ZJ6Q8W3Y5N2V7T9R1M0P").unwrap();
    for n in [10, 1_000, 10_000] {
        let projection = lattice(n);
        let component = format!("component-{}", n / 2);
        c.bench_function(&format!("assignment_for among {n} components"), |b| {
            b.iter(|| {
                black_box(projection.assignment_for(
                    black_box(&instance),
                    black_box(&component),
                    Capability::KeyValue,
                ))
                .unwrap();
            });
        });
    }
}

criterion_group!(benches, lookups);
criterion_main!(benches);
