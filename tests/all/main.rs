//! End-to-end suites: real nats-server, real `trellis` and `trellis-host` processes.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod accounts;
mod capabilities;
mod cli;
mod control;
mod creds;
mod http_status;
mod instances;
mod lifecycle;
mod links;
mod logs;
mod metrics;
mod microvm;
mod polyglot;
mod prometheus_harness;
mod protocol;
mod providers;
mod registry;
mod roles;
mod rollouts;
mod signing;
mod spine;
mod tls;
mod traces;
mod ui;
mod up;
mod workload;
