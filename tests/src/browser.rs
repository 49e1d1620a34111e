//! Headless Chromium driven over the Chrome DevTools Protocol, for tests of the dashboard: load
//! a page, evaluate expressions in it, collect its console errors and uncaught exceptions, and
//! take a screenshot.
//!
//! The browser is Debian's `chromium` (`TRELLIS_CHROMIUM` names another); `scripts/test`
//! installs it. It runs with a fresh profile in a temporary directory and is killed on drop.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The Chromium executable: `TRELLIS_CHROMIUM`, else `chromium` on the `PATH`.
pub fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("TRELLIS_CHROMIUM") {
        return PathBuf::from(path);
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("chromium"))
                .find(|p| p.is_file())
        })
        .expect("chromium is not installed: scripts/test installs it (Debian package chromium)")
}

/// One headless browser with one page.
pub struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    page: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    problems: Vec<String>,
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Browser")
            .field("pid", &self.child.id())
            .field("problems", &self.problems)
            .finish_non_exhaustive()
    }
}

impl Browser {
    /// Starts Chromium with a `width`×`height` window and attaches to its first page.
    pub async fn start(width: u32, height: u32) -> Self {
        let profile = tempfile::tempdir().expect("profile dir");
        let child = Command::new(chromium())
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                &format!("--window-size={width},{height}"),
                &format!("--user-data-dir={}", profile.path().display()),
                "about:blank",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so that its renderer and helper processes end with it.
            .process_group(0)
            .spawn()
            .expect("chromium starts");
        // Chromium writes the port it picked into the profile.
        let port_file = profile.path().join("DevToolsActivePort");
        let port = crate::wait_for("chromium's DevTools port", Duration::from_secs(60), || {
            let port_file = port_file.clone();
            async move {
                let text = std::fs::read_to_string(&port_file).ok()?;
                text.lines().next()?.trim().parse::<u16>().ok()
            }
        })
        .await;
        let targets = crate::http_request("GET", &format!("http://127.0.0.1:{port}/json/list"), "")
            .await
            .expect("chromium lists its targets");
        let targets: Value = serde_json::from_str(&targets.body).expect("targets are JSON");
        let ws = targets
            .as_array()
            .and_then(|all| all.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .expect("chromium has a page")
            .to_owned();
        let (page, _) = tokio_tungstenite::connect_async(ws.as_str())
            .await
            .expect("attach to the page");
        let mut browser = Self {
            child,
            _profile: profile,
            page,
            next_id: 0,
            problems: Vec::new(),
        };
        for domain in ["Page.enable", "Runtime.enable", "Log.enable"] {
            browser.call(domain, json!({})).await;
        }
        browser
    }

    /// Sends one DevTools command and returns its result, noting the events that arrive
    /// meanwhile.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let request = json!({ "id": id, "method": method, "params": params });
        self.page
            .send(Message::text(request.to_string()))
            .await
            .expect("send to chromium");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = tokio::time::timeout(left, self.page.next())
                .await
                .unwrap_or_else(|_| panic!("chromium did not answer {method} within 30 s"))
                .expect("chromium closed the connection")
                .expect("read from chromium");
            let Message::Text(text) = message else {
                continue;
            };
            let value: Value = serde_json::from_str(text.as_str()).expect("DevTools JSON");
            if value["id"] == id {
                if let Some(error) = value.get("error") {
                    panic!("{method} failed: {error}");
                }
                return value["result"].clone();
            }
            self.note(&value);
        }
    }

    /// Keeps console errors, uncaught exceptions and error log entries.
    fn note(&mut self, event: &Value) {
        let params = &event["params"];
        match event["method"].as_str() {
            Some("Runtime.exceptionThrown") => {
                let details = &params["exceptionDetails"];
                let text = details["exception"]["description"]
                    .as_str()
                    .or_else(|| details["text"].as_str())
                    .unwrap_or("an exception");
                self.problems.push(format!("uncaught: {text}"));
            }
            Some("Runtime.consoleAPICalled") if params["type"] == "error" => {
                let args: Vec<String> = params["args"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| {
                        a["value"]
                            .as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| a["description"].to_string())
                    })
                    .collect();
                self.problems
                    .push(format!("console.error: {}", args.join(" ")));
            }
            Some("Log.entryAdded") if params["entry"]["level"] == "error" => {
                self.problems.push(format!(
                    "log: {} {}",
                    params["entry"]["text"], params["entry"]["url"]
                ));
            }
            _ => {}
        }
    }

    /// Loads `url` in the page and waits until it has loaded.
    pub async fn open(&mut self, url: &str) {
        let result = self.call("Page.navigate", json!({ "url": url })).await;
        if let Some(error) = result.get("errorText") {
            panic!("{url} did not load: {error}");
        }
        let url = serde_json::to_string(url).expect("a string");
        self.wait_until(
            "the page to load",
            Duration::from_secs(30),
            &format!("location.href === {url} && document.readyState === 'complete'"),
        )
        .await;
    }

    /// The value of a JavaScript expression in the page.
    pub async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true }),
            )
            .await;
        if let Some(details) = result.get("exceptionDetails") {
            panic!("{expression} threw: {details}");
        }
        result["result"]["value"].clone()
    }

    /// Evaluates `expression` until it is truthy (JavaScript's sense; one that throws counts as
    /// not yet) and returns that value;
    /// panics with `what` and the page's text after `timeout`.
    pub async fn wait_until(&mut self, what: &str, timeout: Duration, expression: &str) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self
                .eval(&format!(
                    "(() => {{ try {{ const v = ({expression}); return v ? v : null; }} catch (e) {{ return null; }} }})()"
                ))
                .await;
            if !value.is_null() {
                return value;
            }
            if Instant::now() > deadline {
                let text = self.eval("document.body.innerText").await;
                panic!(
                    "timed out after {timeout:?} waiting for {what}; the page shows:\n{}",
                    text.as_str().unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Console errors, uncaught exceptions and error log entries seen so far.
    pub fn problems(&self) -> &[String] {
        &self.problems
    }

    /// Writes a PNG of the whole page to `path` (its directory is created).
    pub async fn screenshot(&mut self, path: &Path) {
        let result = self
            .call(
                "Page.captureScreenshot",
                json!({ "format": "png", "captureBeyondViewport": true }),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(result["data"].as_str().expect("screenshot data"))
            .expect("screenshot is base64");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("artifact dir");
        }
        std::fs::write(path, png).expect("write the screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
