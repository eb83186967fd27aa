//! The command connection to Redis: one multiplexed connection shared by the cluster's tasks
//! (commands from several tasks are pipelined on it), connected again after it broke, with the
//! scripts loaded on every new connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, RedisResult};

use super::scripts::Scripts;

/// How long connecting, and one command, may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub struct Link {
    pub client: Client,
    pub scripts: Scripts,
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    /// Whether the last use of the connection succeeded (read by `/healthz`).
    up: AtomicBool,
}

impl Link {
    pub fn new(client: Client) -> Arc<Link> {
        Arc::new(Link {
            client,
            scripts: Scripts::default(),
            conn: tokio::sync::Mutex::new(None),
            up: AtomicBool::new(false),
        })
    }

    /// The connection, connecting (and loading the scripts) when there is none.
    pub async fn get(&self) -> RedisResult<MultiplexedConnection> {
        let mut held = self.conn.lock().await;
        if let Some(conn) = held.as_ref() {
            return Ok(conn.clone());
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let result = async {
            let mut conn = self
                .client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            for script in self.scripts.all() {
                script.load_async(&mut conn).await?;
            }
            Ok(conn)
        }
        .await;
        match result {
            Ok(conn) => {
                if !self.up.swap(true, Ordering::AcqRel) {
                    tracing::info!("cluster: connected to Redis");
                }
                *held = Some(conn.clone());
                Ok(conn)
            }
            Err(e) => {
                self.set_down(&e);
                Err(e)
            }
        }
    }

    /// Reports the outcome of a use of the connection: an error that says the connection is
    /// unusable drops it, so that the next use connects again.
    pub async fn outcome<T>(&self, result: &RedisResult<T>) {
        match result {
            Ok(_) => {
                self.up.store(true, Ordering::Release);
            }
            Err(e) => {
                let no_script = matches!(
                    e.kind(),
                    redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
                );
                if matches!(e.kind(), redis::ErrorKind::Server(_)) && !no_script {
                    // Redis answered (a command's own error): the connection is fine.
                    return;
                }
                if !no_script {
                    self.set_down(e);
                }
                // Unusable, or Redis lost its scripts (a restart the connection survived): the
                // next use connects again and loads them.
                *self.conn.lock().await = None;
            }
        }
    }

    fn set_down(&self, e: &redis::RedisError) {
        if self.up.swap(false, Ordering::AcqRel) {
            tracing::warn!("cluster: Redis unreachable, serving local connections only: {e}");
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }
}

/// The waits between attempts to reach Redis: 50 ms doubling up to 2 s.
#[derive(Debug)]
pub struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(Duration::from_millis(50))
    }
}

impl Backoff {
    pub fn next(&mut self) -> Duration {
        let wait = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(2));
        wait
    }

    pub fn reset(&mut self) {
        *self = Backoff::default();
    }
}
