//! A real Prometheus server for the metrics suites: it scrapes `127.0.0.1:PORT` targets serving
//! the Prometheus text exposition at `/metrics` every second, and answers PromQL through its HTTP
//! API.
//!
//! The binary is the one `TRELLIS_PROMETHEUS` names, else `prometheus` on `PATH`; `scripts/test`
//! installs Debian's package `prometheus` when neither is there.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{Proc, free_port, http_request, scratch_dir};

/// How long [`Prometheus::start`] waits for the server to report itself ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How often [`Prometheus::wait_for_query`] and [`Prometheus::targets_up`] ask again.
const POLL: Duration = Duration::from_millis(500);

/// A Prometheus server on a free loopback port, with its configuration and TSDB in a temporary
/// directory; killed (and the directory removed) on drop.
#[derive(Debug)]
pub struct Prometheus {
    /// The server process. Declared before `dir` so that it is killed before its TSDB is removed.
    proc: Proc,
    /// The configuration, the TSDB and the server's log (kept with `TRELLIS_KEEP_LOGS=1`).
    dir: tempfile::TempDir,
    /// The port of its HTTP API, on 127.0.0.1.
    pub port: u16,
    /// The scrape targets it was configured with: (job name, `host:port`).
    targets: Vec<(String, String)>,
}

impl Prometheus {
    /// Starts a server scraping every `(job name, "127.0.0.1:PORT")` of `targets` at `/metrics`
    /// every second (one scrape job per pair), and waits up to 60 s until `GET /-/ready` answers
    /// 200. Panics when the server cannot be found, exits, or does not become ready.
    pub async fn start(targets: &[(&str, String)]) -> Self {
        // `TRELLIS_KEEP_LOGS=1` keeps the directory (configuration, TSDB and log).
        let dir = scratch_dir("trellis-prometheus-");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, config_yaml(targets)).unwrap();
        let port = free_port();
        let args = vec![
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
        ];
        let proc = Proc::spawn("prometheus", &binary(), &args, dir.path());
        let mut prometheus = Self {
            proc,
            dir,
            port,
            targets: targets
                .iter()
                .map(|(job, addr)| ((*job).to_owned(), addr.clone()))
                .collect(),
        };
        prometheus.wait_ready().await;
        prometheus
    }

    async fn wait_ready(&mut self) {
        let url = format!("{}/-/ready", self.url());
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(reply) = http_request("GET", &url, "").await
                && reply.status == 200
            {
                return;
            }
            assert!(
                self.proc.running(),
                "prometheus exited before it was ready; its log ({}):\n{}",
                self.dir.path().display(),
                self.proc.log()
            );
            assert!(
                Instant::now() < deadline,
                "prometheus was not ready within {READY_TIMEOUT:?}; its log:\n{}",
                self.proc.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// GETs `path` of the HTTP API and returns its `data`, asserting that the answer is JSON with
    /// `status: "success"`.
    async fn api(&self, path: &str) -> Value {
        let url = format!("{}{path}", self.url());
        let reply = http_request("GET", &url, "")
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let body: Value = serde_json::from_str(&reply.body).unwrap_or_else(|e| {
            panic!(
                "GET {url} answered {} with a body that is not JSON ({e}): {}",
                reply.status, reply.body
            )
        });
        assert_eq!(
            body["status"], "success",
            "GET {url} answered {}: {body}",
            reply.status
        );
        body["data"].clone()
    }

    /// Evaluates `promql` now (`GET /api/v1/query`) and returns `data.result`: for an instant
    /// vector, an array of `{"metric": {labels}, "value": [unix time, "value"]}`. Panics unless
    /// Prometheus answers `status: "success"` (a malformed query, for one).
    pub async fn query(&self, promql: &str) -> Value {
        let data = self
            .api(&format!("/api/v1/query?query={}", url_encode(promql)))
            .await;
        data["result"].clone()
    }

    /// Evaluates `promql` every 500 ms until `ok` accepts its result (see [`Prometheus::query`]),
    /// and returns that result; after `timeout`, panics naming `what`, the query and the last
    /// result.
    pub async fn wait_for_query(
        &self,
        what: &str,
        promql: &str,
        timeout: Duration,
        ok: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let result = self.query(promql).await;
            if ok(&result) {
                return result;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}: query `{promql}` last returned {result}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until every configured target has been scraped successfully (`health: "up"` in
    /// `GET /api/v1/targets`); after `timeout`, panics with each target's health and last error.
    ///
    /// Prometheus hands new targets to its scrapers only every 5 s, so this takes about that long
    /// after [`Prometheus::start`].
    pub async fn targets_up(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let data = self.api("/api/v1/targets").await;
            let active = data["activeTargets"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let states: Vec<String> = self
                .targets
                .iter()
                .map(|(job, addr)| {
                    let found = active.iter().find(|t| {
                        t["scrapePool"] == job.as_str()
                            && t["discoveredLabels"]["__address__"] == addr.as_str()
                    });
                    match found {
                        Some(t) if t["health"] == "up" => String::new(),
                        Some(t) => format!(
                            "{job} ({addr}): health {}, last error {}",
                            t["health"], t["lastError"]
                        ),
                        None => format!("{job} ({addr}): not among the active targets yet"),
                    }
                })
                .filter(|s| !s.is_empty())
                .collect();
            if states.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus targets not up after {timeout:?}:\n  {}",
                states.join("\n  ")
            );
            tokio::time::sleep(POLL).await;
        }
    }
}

/// The Prometheus server binary: `TRELLIS_PROMETHEUS`, else `prometheus` on `PATH`; panics with
/// instructions when there is none.
fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TRELLIS_PROMETHEUS") {
        let path = PathBuf::from(path);
        assert!(
            is_executable(&path),
            "TRELLIS_PROMETHEUS={} is not an executable",
            path.display()
        );
        return path;
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("prometheus"))
        .find(|p| is_executable(p))
        .unwrap_or_else(|| {
            panic!(
                "no Prometheus server: set TRELLIS_PROMETHEUS or put `prometheus` on PATH \
                 (run scripts/test, which installs it, or install Debian's package `prometheus`)"
            )
        })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The configuration: a 1 s scrape and evaluation interval, and one scrape job per target.
/// Strings are written as JSON strings, which YAML reads as double-quoted scalars.
fn config_yaml(targets: &[(&str, String)]) -> String {
    let quote = |s: &str| serde_json::to_string(s).unwrap();
    let mut yaml = String::from(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n",
    );
    for (job, addr) in targets {
        yaml.push_str(&format!(
            "  - job_name: {}\n    metrics_path: /metrics\n    static_configs:\n      - targets: [{}]\n",
            quote(job),
            quote(addr)
        ));
    }
    yaml
}

/// Percent-encodes every byte of `s` outside `A-Za-z0-9-_.~`, for a query-string value.
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_encode_keeps_unreserved_and_escapes_the_rest() {
        assert_eq!(url_encode("aZ09-_.~"), "aZ09-_.~");
        assert_eq!(
            url_encode(r#"sum(rate(x{k="a b"}[1m]))"#),
            "sum%28rate%28x%7Bk%3D%22a%20b%22%7D%5B1m%5D%29%29"
        );
        assert_eq!(url_encode("é+&"), "%C3%A9%2B%26");
    }

    #[test]
    fn config_has_one_job_per_target() {
        let yaml = config_yaml(&[("a", "127.0.0.1:1".into()), ("b", "127.0.0.1:2".into())]);
        assert!(yaml.starts_with("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"));
        assert!(yaml.contains("  - job_name: \"a\"\n    metrics_path: /metrics\n"));
        assert!(yaml.contains("      - targets: [\"127.0.0.1:2\"]\n"));
    }
}
