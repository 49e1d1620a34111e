//! Child processes that never outlive the process that started them.
//!
//! `trellis up` starts nats-server, a controller, a host and providers; a host starts the
//! providers it supervises. Each stops its children in order when it is asked to stop, but a
//! process that is `SIGKILL`ed (or crashes) cannot: [`spawn_tied`] has the kernel send the child
//! `SIGTERM` when its parent dies (Linux `PR_SET_PDEATHSIG`), which every Trellis process and
//! nats-server handle as "stop now".
//!
//! Linux delivers that signal when the *thread* that forked the child exits, not the process.
//! A tokio task may run on any worker thread, and a worker thread can end before the process
//! does (`block_in_place` hands its worker role to a new thread, idle blocking threads exit),
//! which would kill a healthy child. So every tied child is forked from one dedicated thread that
//! lives as long as the process. And since the parent may die between `fork` and `prctl`, the
//! child checks that its parent is still the process that forked it, and fails to start if not.

use std::io;
use std::sync::OnceLock;
use std::sync::mpsc;

use tokio::process::{Child, Command};
use tokio::sync::oneshot;

/// One spawn request for the spawner thread.
struct Job {
    command: Command,
    runtime: tokio::runtime::Handle,
    reply: oneshot::Sender<io::Result<Child>>,
}

/// The spawner thread's queue, started on first use.
fn spawner() -> io::Result<&'static mpsc::Sender<Job>> {
    static SPAWNER: OnceLock<io::Result<mpsc::Sender<Job>>> = OnceLock::new();
    SPAWNER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Job>();
            std::thread::Builder::new()
                .name("trellis-spawner".into())
                .spawn(move || {
                    // Never returns while the process lives: the sender is in a static.
                    for mut job in rx {
                        let _runtime = job.runtime.enter();
                        let _ = job.reply.send(job.command.spawn());
                    }
                })
                .map(|_| tx)
        })
        .as_ref()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot start the spawner thread: {e}")))
}

/// Spawns `command` so that the child receives `SIGTERM` when this process dies, however it dies
/// (on Linux; elsewhere it is spawned as usual). Must be called within a tokio runtime, like
/// [`Command::spawn`].
pub async fn spawn_tied(mut command: Command) -> io::Result<Child> {
    die_with_parent(&mut command);
    let (reply, answer) = oneshot::channel();
    let job = Job {
        command,
        runtime: tokio::runtime::Handle::current(),
        reply,
    };
    spawner()?
        .send(job)
        .map_err(|_| io::Error::other("the spawner thread has ended"))?;
    answer
        .await
        .map_err(|_| io::Error::other("the spawner thread has ended"))?
}

#[cfg(target_os = "linux")]
#[allow(
    unsafe_code,
    reason = "pre_exec runs between fork and exec; see the safety comment"
)]
fn die_with_parent(command: &mut Command) {
    use nix::sys::signal::Signal;
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec. It makes two system calls
    // (prctl(2) and getppid(2)), both async-signal-safe, and builds its error from a raw errno:
    // it neither allocates nor takes a lock.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(io::Error::from)?;
            if nix::unistd::getppid() != parent {
                // The parent died before the death signal was armed: do not run unsupervised.
                return Err(io::Error::from_raw_os_error(nix::libc::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_command: &mut Command) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tied_children_run_and_report_their_status() {
        let mut command = Command::new("sh");
        command.args(["-c", "exit 3"]);
        let mut child = spawn_tied(command).await.expect("spawns");
        let status = child.wait().await.expect("waits");
        assert_eq!(status.code(), Some(3));
        // From a task on another worker, twice: the spawner thread serves every caller.
        let status = tokio::spawn(async {
            let mut child = spawn_tied(Command::new("true")).await.expect("spawns");
            child.wait().await.expect("waits")
        })
        .await
        .expect("joins");
        assert!(status.success());
        let missing = spawn_tied(Command::new("/nonexistent/trellis-test")).await;
        assert_eq!(
            missing.map(|_| ()).map_err(|e| e.kind()),
            Err(io::ErrorKind::NotFound)
        );
    }
}
