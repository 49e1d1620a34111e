//! Declaring silent hosts lost, exactly once across replicas; the replica whose declaration is
//! stored then relocates the lost host's instances (see [`super::relocate`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use trellis_schemas::{Event, FactData, HostId, HostLost, fact::source};

use super::state::State;

/// Checks liveness every quarter of the timeout until aborted.
pub(crate) async fn run(state: Arc<State>) {
    let timeout = state.config.host_timeout;
    let period = (timeout / 4).max(Duration::from_millis(50));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The status sequence of each host this replica already tried to declare lost, so it tries
    // once per period of life of the host, not on every tick while its fact travels.
    let mut attempted: HashMap<HostId, u64> = HashMap::new();
    let source = source(
        &state.config.lattice,
        "controller",
        &state.config.replica_id,
    );
    let mut was_connected = true;
    loop {
        ticker.tick().await;
        // A replica that cannot hear heartbeats must not judge hosts by their silence: while
        // disconnected it declares nothing, and once back it gives every host twice the timeout
        // (hosts reconnect with their own backoff).
        let connected = state.client.connection_state() == async_nats::connection::State::Connected;
        if !connected {
            was_connected = false;
            continue;
        }
        if !was_connected {
            was_connected = true;
            tracing::info!("reconnected; restarting host liveness timers");
            state.grant_grace(timeout);
            continue;
        }
        for (host_id, status_seq, silent_for) in silent_hosts(&state, timeout) {
            if attempted.get(&host_id) == Some(&status_seq) {
                continue;
            }
            attempted.insert(host_id.clone(), status_seq);
            let event = Event::new(
                source.clone(),
                FactData::HostLost(HostLost {
                    host_id: host_id.clone(),
                    silent_for_ms: silent_for.as_millis() as u64,
                    timeout_ms: timeout.as_millis() as u64,
                    detected_by: state.config.replica_id.clone(),
                }),
            );
            // Stored only if no fact about the host came after the one this replica knows: not
            // another replica's `host.lost`, and not a `host.stopped` or `host.started` that
            // this replica's reader has not applied yet (it may lag, after a NATS outage say).
            let facts = trellis_schemas::subject::host_facts(&state.config.lattice, &host_id);
            match trellis_bus::publish_exclusive_among(
                &state.js,
                &state.config.lattice,
                &event,
                &facts,
                status_seq,
            )
            .await
            {
                Ok(Some(seq)) => {
                    tracing::warn!(host = %host_id, seq, silent_ms = silent_for.as_millis() as u64, "host declared lost");
                    // This replica's declaration is the one stored: it alone relocates.
                    tokio::spawn(super::relocate::relocate(
                        state.clone(),
                        host_id.clone(),
                        seq,
                        event.id.to_string(),
                    ));
                }
                Ok(None) => {
                    tracing::debug!(host = %host_id, "a fact about the host came first (another replica's declaration, or its stop)");
                }
                Err(e) => {
                    // Try again on a later tick.
                    attempted.remove(&host_id);
                    tracing::warn!(host = %host_id, error = %e, "cannot publish host.lost");
                }
            }
        }
    }
}

/// Hosts that are up and silent for longer than `timeout`: id, the sequence of the last fact
/// about the host (its `host.started`), and how long they have been silent.
fn silent_hosts(state: &State, timeout: Duration) -> Vec<(HostId, u64, Duration)> {
    let now = Instant::now();
    let projection = state.projection();
    let live = state.live();
    projection
        .hosts_up()
        .filter_map(|h| {
            let last_seen = live
                .get(&h.host_id)
                .map(|l| l.last_seen)
                .unwrap_or(state.started);
            let silent_for = now.saturating_duration_since(last_seen);
            (silent_for > timeout).then(|| (h.host_id.clone(), h.status_seq, silent_for))
        })
        .collect()
}
