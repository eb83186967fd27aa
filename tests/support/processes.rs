//! Real processes for the cluster tests: a `redis-server` and `plexus serve` nodes, each
//! started on a free port and stopped when dropped (`kill_on_drop`).

use std::net::SocketAddr;
use std::process::Stdio;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::{Client, TempDir, within};

/// A free port on loopback (bound, read, released: Redis binds it next).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding port 0");
    listener.local_addr().expect("the bound address").port()
}

/// A `redis-server` of this test, without persistence: a restart loses everything.
pub struct Redis {
    child: Child,
    pub port: u16,
}

impl Redis {
    pub async fn start() -> Redis {
        Redis::start_on(free_port()).await
    }

    pub async fn start_on(port: u16) -> Redis {
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawning redis-server (is it installed?)");
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        within("redis-server to accept connections", async {
            while let Some(line) = lines.next_line().await.expect("reading redis-server") {
                if line.contains("Ready to accept connections") {
                    return;
                }
            }
            panic!("redis-server exited before it was ready");
        })
        .await;
        // Keep draining its output so that it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Redis { child, port }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub async fn kill(&mut self) {
        self.child.start_kill().expect("killing redis-server");
        let _ = self.child.wait().await;
    }

    /// One command on a fresh connection.
    pub async fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let client = redis::Client::open(self.url()).unwrap();
        let mut conn = within(
            "connecting to Redis",
            client.get_multiplexed_async_connection(),
        )
        .await
        .expect("connecting to Redis");
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        within("a Redis command", cmd.query_async(&mut conn))
            .await
            .expect("a Redis command")
    }

    /// The commands Redis processed so far (those scripts run included).
    pub async fn commands(&self) -> u64 {
        let info: String = self.cmd(&["INFO", "stats"]).await;
        info.lines()
            .find_map(|l| l.strip_prefix("total_commands_processed:"))
            .and_then(|n| n.trim().parse().ok())
            .expect("total_commands_processed")
    }

    /// How many nodes subscribe to a room's channel.
    pub async fn subscribers(&self, room: &str) -> u64 {
        let channel = format!("plexus:r:{room}");
        let (_, n): (String, u64) = self.cmd(&["PUBSUB", "NUMSUB", &channel]).await;
        n
    }
}

/// A `plexus serve` process in the cluster.
pub struct Node {
    child: Child,
    pub addr: SocketAddr,
}

impl Node {
    /// A node of the cluster of `redis`, serving `manifests`, with `extra` flags.
    pub async fn start(redis: &Redis, manifests: &TempDir, extra: &[&str]) -> Node {
        let url = redis.url();
        let mut args = vec!["--cluster", url.as_str()];
        args.extend_from_slice(extra);
        Node::spawn(manifests, &args).await
    }

    /// A node of its own, without a cluster.
    pub async fn start_alone(manifests: &TempDir) -> Node {
        Node::spawn(manifests, &[]).await
    }

    async fn spawn(manifests: &TempDir, extra: &[&str]) -> Node {
        let mut child = Command::new(super::plexus_bin())
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--no-build",
                "--manifests",
            ])
            .arg(manifests.path())
            .args(extra)
            .args(["--max-messages-per-second", "0", "--dev-insecure-identity"])
            .env(
                "RUST_LOG",
                std::env::var("PLEXUS_TEST_LOG").unwrap_or_else(|_| "error".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawning plexus serve");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let addr = super::listening_addr(&mut stdout)
            .await
            .unwrap_or_else(|line| panic!("unexpected first line {line:?}"));
        tokio::spawn(async move {
            let mut sink = String::new();
            while stdout.read_line(&mut sink).await.is_ok_and(|n| n > 0) {
                sink.clear();
            }
        });
        Node { child, addr }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("a running node")
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.addr).await
    }

    pub async fn healthz(&self) -> Value {
        let resp = super::http_get(self.addr, "/healthz").await;
        serde_json::from_str(&resp.body).expect("healthz JSON")
    }

    /// Stops the process with SIGTERM (a graceful shutdown) and waits for it to exit.
    pub async fn terminate(&mut self) {
        let pid = self.child.id().expect("a running node").to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .expect("running kill");
        assert!(status.success());
        within("the node to shut down", self.child.wait())
            .await
            .expect("waiting for the node");
    }

    /// Kills the process with SIGKILL: no goodbye to the cluster.
    pub async fn kill(&mut self) {
        self.child.start_kill().expect("killing a node");
        let _ = self.child.wait().await;
    }
}
