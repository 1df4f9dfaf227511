//! The one agent harness: starts the real `tcpstate agent`, waits until it serves, scrapes it,
//! parses the exposition, signals it. Only the standard library, so that both the integration
//! tests (through `support`) and `cargo xtask bench` compile this same file.
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What "started" means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ready {
    /// `/metrics` answers 200.
    Serving,
    /// `/readyz` answers 200: attached, and the first sock_diag dump seeded the table.
    Seeded,
}

/// A running agent, killed on drop.
pub struct Agent {
    pub child: Child,
    /// Where its HTTP server listens (`--listen`).
    pub addr: String,
    conn: Mutex<Option<BufReader<TcpStream>>>,
}

impl Agent {
    /// Runs `BIN agent --listen ADDR ARGS...` with its stderr going to `stderr`, and waits up to
    /// `timeout` until it is `ready`.
    pub fn start(
        bin: &Path,
        addr: &str,
        args: &[&str],
        stderr: Stdio,
        ready: Ready,
        timeout: Duration,
    ) -> Result<Agent, String> {
        let child = Command::new(bin)
            .args(["agent", "--listen", addr])
            .args(args)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let mut agent = Agent {
            child,
            addr: addr.to_string(),
            conn: Mutex::new(None),
        };
        agent.wait(ready, timeout)?;
        Ok(agent)
    }

    /// Waits up to `timeout` until the agent is `ready`; fails at once if it exits.
    pub fn wait(&mut self, ready: Ready, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let path = match ready {
            Ready::Serving => "/metrics",
            Ready::Seeded => "/readyz",
        };
        loop {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Err(format!("the agent exited ({status})"));
            }
            if self.get(path).is_ok_and(|(status, _)| status == 200) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the agent did not answer 200 on {path} within {timeout:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Status and body of a GET to the agent, over one kept-alive connection (a connection per
    /// request would leave a TIME_WAIT socket per scrape for the agent to count).
    pub fn get(&self, path: &str) -> Result<(u16, String), String> {
        let mut conn = self.conn.lock().map_err(|_| "poisoned".to_string())?;
        if let Some(c) = conn.as_mut()
            && let Ok(reply) = request(c, path)
        {
            return Ok(reply);
        }
        // No connection yet, or the agent closed it: one new one.
        let stream = TcpStream::connect(&self.addr).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        let c = conn.insert(BufReader::new(stream));
        request(c, path)
    }

    /// The exposition, or why there is none.
    pub fn metrics(&self) -> Result<String, String> {
        match self.get("/metrics")? {
            (200, body) => Ok(body),
            (status, body) => Err(format!("/metrics answered {status}: {body}")),
        }
    }

    /// Sends a signal by name (`TERM`, `INT`, `KILL`).
    pub fn signal(&self, name: &str) -> Result<(), String> {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .map_err(|e| format!("cannot run kill: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("kill -{name} {} failed ({status})", self.pid()))
        }
    }

    /// Waits up to `timeout` for the agent to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(format!("the agent did not exit within {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 GET on a kept-alive connection: status and body (by Content-Length).
fn request(c: &mut BufReader<TcpStream>, path: &str) -> Result<(u16, String), String> {
    c.get_mut()
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: tcpstate\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut status_line = String::new();
    if c.read_line(&mut status_line).map_err(|e| e.to_string())? == 0 {
        return Err("the agent closed the connection".into());
    }
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("malformed HTTP status line `{}`", status_line.trim()))?;
    let mut length = None;
    loop {
        let mut line = String::new();
        c.read_line(&mut line).map_err(|e| e.to_string())?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse::<usize>().ok();
        }
    }
    let length = length.ok_or("the reply has no Content-Length")?;
    let mut body = vec![0u8; length];
    c.read_exact(&mut body).map_err(|e| e.to_string())?;
    Ok((status, String::from_utf8_lossy(&body).to_string()))
}

/// Parses `name{labels} value` lines into (labels, value).
pub fn samples(text: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (labels, value) = if let Some(rest) = rest.strip_prefix('{') {
            let Some((l, v)) = rest.split_once("} ") else {
                continue;
            };
            (l, v)
        } else if let Some(v) = rest.strip_prefix(' ') {
            ("", v)
        } else {
            continue;
        };
        let mut map = BTreeMap::new();
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once("=\"").expect("label pair");
            map.insert(k.to_string(), v.trim_end_matches('"').to_string());
        }
        out.push((map, value.trim().parse().expect("sample value")));
    }
    out
}

/// The value of the one sample of `name` whose labels include `want`.
pub fn value(text: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    samples(text, name)
        .into_iter()
        .find(|(l, _)| {
            want.iter()
                .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| v)
}
