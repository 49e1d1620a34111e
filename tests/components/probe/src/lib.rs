//! Tries to reach what a component must not have: environment, arguments, files, network, stdin.
//! Returns one `name=outcome` line per attempt; the host must deny every one of them.
use std::io::Read;

wit_bindgen::generate!({ world: "guest", path: "../wit" });

struct Probe;

fn outcome<T>(result: std::io::Result<T>) -> &'static str {
    if result.is_ok() { "granted" } else { "denied" }
}

impl Guest for Probe {
    fn run(_input: String) -> String {
        let mut stdin = Vec::new();
        let stdin_read = std::io::stdin().read_to_end(&mut stdin);
        let lines = [
            format!("env={}", std::env::vars().count()),
            format!("args={}", std::env::args().count()),
            format!("read_root={}", outcome(std::fs::read_dir("/"))),
            format!("read_file={}", outcome(std::fs::read("/etc/passwd"))),
            format!(
                "write_file={}",
                outcome(std::fs::write("/tmp/trellis-probe", b"x"))
            ),
            format!("cwd_list={}", outcome(std::fs::read_dir("."))),
            format!(
                "tcp_connect={}",
                outcome(std::net::TcpStream::connect("127.0.0.1:4222"))
            ),
            format!(
                "udp_bind={}",
                outcome(std::net::UdpSocket::bind("0.0.0.0:0"))
            ),
            format!(
                "stdin_bytes={}",
                stdin_read.map(|_| stdin.len()).unwrap_or(0)
            ),
            format!(
                "clock_ok={}",
                std::time::SystemTime::now().elapsed().is_ok()
            ),
        ];
        lines.join("\n")
    }
}

export!(Probe);
