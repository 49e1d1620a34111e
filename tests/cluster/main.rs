//! Many nodes: a lattice spread over Docker containers on one network (NATS with JetStream on a
//! volume, three hosts with different labels, two controller replicas, providers on nodes of their own), driven from the test
//! process through NATS's mapped port. Nodes are killed, paused and restarted mid-test; the facts
//! must tell what happened, exactly once.
//!
//! Needs Docker; the images are built from the target directory's binaries by `scripts/images`
//! (see `trellis_tests::cluster`). Figures (time to `host.lost`, time until relocated instances
//! serve, replay time) are printed, never asserted.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod common;
mod controllers;
mod etcd;
mod hosts;
mod leaf;
mod nats;
mod nats_cluster;
mod providers;
mod scheduling;
