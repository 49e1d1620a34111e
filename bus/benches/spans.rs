//! What a span costs: the CPU time one invocation's span takes on the thread that serves it, and
//! in the whole process (the batch processor's thread and the exporter included), with every
//! span exported over OTLP/HTTP to a receiver in this process that reads and discards it.
//!
//! Spans are made as a host makes them (a remote parent, a name, two attributes), at
//! `TRELLIS_BENCH_SPAN_RATE` per second (default 60,000, about what one host serves in the
//! `calls` benchmark), `TRELLIS_BENCH_SPANS` in all (default 600,000).
//!
//! Run: `cargo bench -p trellis-bus --bench spans`.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark")]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::resource::{UsageWho, getrusage};
use nix::time::{ClockId, clock_gettime};
use trellis_bus::telemetry::{self, Kind, Span};
use trellis_schemas::dataplane::span_attributes;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    Duration::from(clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).unwrap())
}

/// CPU time of the whole process.
fn process_cpu() -> Duration {
    let usage = getrusage(UsageWho::RUSAGE_SELF).unwrap();
    let time =
        |t: nix::sys::time::TimeVal| Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000);
    time(usage.user_time()) + time(usage.system_time())
}

/// An OTLP/HTTP receiver that reads each request and answers 200; counts requests and bytes, and
/// the CPU time it spends.
fn receiver() -> (String, Arc<[AtomicU64; 3]>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let counts: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
    let shared = Arc::clone(&counts);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let counts = Arc::clone(&shared);
            std::thread::spawn(move || {
                let mut stream = stream.unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let started = thread_cpu();
                loop {
                    let mut length = 0usize;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some((name, value)) = line.split_once(':')
                            && name.eq_ignore_ascii_case("content-length")
                        {
                            length = value.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).unwrap();
                    stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .unwrap();
                    counts[0].fetch_add(1, Ordering::Relaxed);
                    counts[1].fetch_add(length as u64, Ordering::Relaxed);
                    counts[2].store(
                        (thread_cpu() - started).as_nanos() as u64,
                        Ordering::Relaxed,
                    );
                }
            });
        }
    });
    (url, counts)
}

fn main() {
    let total = env_u64("TRELLIS_BENCH_SPANS", 600_000);
    let rate = env_u64("TRELLIS_BENCH_SPAN_RATE", 60_000);
    let (url, counts) = receiver();
    // SAFETY: the receiver's threads do not read the environment, and no other thread runs yet.
    #[allow(
        unsafe_code,
        reason = "pointing the exporter at the receiver before it starts"
    )]
    unsafe {
        std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", &url);
    }
    let telemetry = telemetry::init("trellis-bench");
    assert!(telemetry::enabled(), "export is on");
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    // Made once per instance, as the host makes them.
    let attributes = telemetry::Attributes::new([
        (span_attributes::COMPONENT, Arc::from("typed")),
        (
            span_attributes::INSTANCE,
            Arc::from("01JBENCHINSTANCE0000000000"),
        ),
    ]);
    let chunk = (rate / 100).max(1);
    let (cpu0, process0, wall) = (thread_cpu(), process_cpu(), Instant::now());
    let mut made = 0;
    while made < total {
        let due = wall + Duration::from_secs_f64(made as f64 / rate as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        for _ in 0..chunk.min(total - made) {
            let span = Span::start_with(
                Kind::Server,
                Some(parent),
                || "invoke typed add".to_owned(),
                &attributes,
            );
            std::hint::black_box(span.traceparent());
            drop(span);
        }
        made += chunk.min(total - made);
    }
    let hot = thread_cpu() - cpu0;
    drop(telemetry);
    let process = process_cpu() - process0;
    let per = |d: Duration| d.as_nanos() as f64 / total as f64;
    let receiver = Duration::from_nanos(counts[2].load(Ordering::Relaxed));
    println!(
        "{total} spans at {rate}/s: {:.0} ns/span on the serving thread, {:.0} ns/span in the \
         process without the receiver ({:.0} with it); {} requests, {:.0} bytes/span",
        per(hot),
        per(process.saturating_sub(receiver)),
        per(process),
        counts[0].load(Ordering::Relaxed),
        counts[1].load(Ordering::Relaxed) as f64 / total as f64,
    );
}
