//! The engine's single epoch ticker thread.

use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::Engine;

/// Increments the engine's epoch every tick, on one thread for the whole engine (not one per
/// invocation). Invocations check their wall-clock deadline when the epoch moves.
///
/// The thread holds only a weak reference to the engine, and stops when this value is dropped
/// (or the engine is gone).
#[derive(Debug)]
pub(crate) struct EpochTicker {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    pub(crate) fn start(engine: &Engine, tick: Duration) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel::<()>();
        let engine = engine.weak();
        let thread = std::thread::Builder::new()
            .name("trellis-epoch".to_string())
            .spawn(move || {
                // Any message, or the sender being dropped, stops the thread.
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(tick) {
                    match engine.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
            })?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            // The thread only loops on a channel: it cannot panic, and a join error is moot.
            let _ = thread.join();
        }
    }
}
