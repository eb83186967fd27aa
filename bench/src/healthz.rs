//! Reads the host's `GET /healthz` over one kept-alive HTTP/1.1 connection, to learn which
//! version of a plugin serves.
//!
//! A few dozen lines of HTTP rather than a client crate: the generator asks one loopback server
//! one fixed question, and the answer always carries a `Content-Length`.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Longest wait for one answer.
const TIMEOUT: Duration = Duration::from_secs(2);

/// A `/healthz` reader, reconnecting when the server closed its connection.
#[derive(Debug)]
pub struct Healthz {
    addr: SocketAddr,
    host: String,
    conn: Option<BufReader<TcpStream>>,
}

impl Healthz {
    pub fn new(addr: SocketAddr, host: &str) -> Self {
        Healthz {
            addr,
            host: host.to_string(),
            conn: None,
        }
    }

    /// The body of `/healthz`, parsed. One retry on a fresh connection when the kept-alive one
    /// fails (the server may have closed it).
    pub async fn get(&mut self) -> Result<Value, String> {
        let reused = self.conn.is_some();
        match tokio::time::timeout(TIMEOUT, self.get_once()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if !reused => return Err(e),
            Err(_) if !reused => {
                self.conn = None;
                return Err("GET /healthz: no answer within 2 s".into());
            }
            _ => self.conn = None,
        }
        match tokio::time::timeout(TIMEOUT, self.get_once()).await {
            Ok(r) => r,
            Err(_) => {
                self.conn = None;
                Err("GET /healthz: no answer within 2 s".into())
            }
        }
    }

    /// The version `/healthz` lists for plugin `id` (`None` when it lists none).
    pub async fn plugin_version(&mut self, id: &str) -> Result<Option<String>, String> {
        Ok(plugin_version(&self.get().await?, id))
    }

    async fn get_once(&mut self) -> Result<Value, String> {
        let r = self.exchange().await;
        if r.is_err() {
            self.conn = None;
        }
        r
    }

    async fn exchange(&mut self) -> Result<Value, String> {
        if self.conn.is_none() {
            let s = TcpStream::connect(self.addr)
                .await
                .map_err(|e| format!("GET /healthz: connect: {e}"))?;
            s.set_nodelay(true).map_err(|e| e.to_string())?;
            self.conn = Some(BufReader::new(s));
        }
        let conn = self.conn.as_mut().expect("connected above");
        let req = format!("GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n", self.host);
        conn.get_mut()
            .write_all(req.as_bytes())
            .await
            .map_err(|e| format!("GET /healthz: write: {e}"))?;
        let mut line = String::new();
        let mut status = None;
        let mut length = None;
        let mut close = false;
        loop {
            line.clear();
            let n = conn
                .read_line(&mut line)
                .await
                .map_err(|e| format!("GET /healthz: read: {e}"))?;
            if n == 0 {
                return Err("GET /healthz: connection closed".into());
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if status.is_none() {
                status = l.split_whitespace().nth(1).map(str::to_string);
                continue;
            }
            if let Some((k, v)) = l.split_once(':') {
                let (k, v) = (k.trim(), v.trim());
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.parse::<usize>().ok();
                } else if k.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close") {
                    close = true;
                }
            }
        }
        let length = length.ok_or("GET /healthz: no Content-Length")?;
        let mut body = vec![0; length];
        conn.read_exact(&mut body)
            .await
            .map_err(|e| format!("GET /healthz: body: {e}"))?;
        if close {
            self.conn = None;
        }
        if status.as_deref() != Some("200") {
            return Err(format!(
                "GET /healthz: status {}",
                status.unwrap_or_default()
            ));
        }
        serde_json::from_slice(&body).map_err(|e| format!("GET /healthz: body: {e}"))
    }
}

/// `plugins.<id>.version`, or `plugins.<id>` itself when it is a string (older hosts).
pub fn plugin_version(health: &Value, id: &str) -> Option<String> {
    match health.get("plugins")?.get(id)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("version")?.as_str().map(str::to_string),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_both_shapes() {
        let old = json!({"plugins": {"answer": "abc"}});
        assert_eq!(plugin_version(&old, "answer").as_deref(), Some("abc"));
        let new = json!({"plugins": {"answer": {"version": "sha256:1", "swaps": 2}}});
        assert_eq!(plugin_version(&new, "answer").as_deref(), Some("sha256:1"));
        assert_eq!(plugin_version(&new, "other"), None);
        assert_eq!(plugin_version(&json!({}), "answer"), None);
    }
}
