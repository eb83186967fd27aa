//! The HTTP front: the accept loop (TLS when configured), `GET /healthz`, the WebSocket upgrade
//! at `GET /ws` (admitted by [`crate::auth`] first), and graceful shutdown (stop accepting, let
//! in-flight calls finish, close sockets with 1001).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::task::TaskTracker;

use crate::auth::{Auth, AuthConfig};
use crate::connection;
use crate::edge::tls::{self, TlsFiles};
use crate::error::CloseReason;
use crate::lifecycle;
use crate::manifest::ManifestError;
use crate::plugin::wasm::Runtime;
use crate::registry::{LoadOptions, Registry, ReloadEvent, RollbackError, SwapPolicy};
use crate::rooms::Rooms;
use crate::router::{HostLimits, Hub};
use crate::session::{Identity, SessionPolicy};
use crate::watch::{self as watcher, WatchMode};

/// How a host is configured.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub manifests: PathBuf,
    /// Build plugins whose artifacts are missing or stale.
    pub build: bool,
    pub watch: WatchMode,
    pub limits: HostLimits,
    /// Bytes tungstenite reads at a time per connection (its default, 128 KiB, costs that
    /// much memory per idle connection).
    pub read_buffer_bytes: usize,
    /// Previous versions kept warm, probation and automatic rollback after a swap.
    pub swap: SwapPolicy,
    /// How long a client may take to send its HTTP request head (the WebSocket upgrade request
    /// included) after connecting; then the connection is closed.
    pub request_head_timeout: Duration,
    /// Sessions, resumes, retries, presence, heartbeats and outbox bounds.
    pub session: SessionPolicy,
    /// Who may connect: token verification, guests, the Origin allow-list.
    pub auth: AuthConfig,
    /// Serve `wss://` and `https://` with this certificate and key.
    pub tls: Option<TlsFiles>,
    /// Join a cluster through Redis (`None`: a single node, everything in memory).
    pub cluster: Option<crate::cluster::ClusterConfig>,
}

impl Config {
    /// A host on `127.0.0.1:8080` serving the manifests in `manifests`.
    pub fn new(manifests: impl Into<PathBuf>) -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            manifests: manifests.into(),
            build: true,
            watch: WatchMode::Artifacts,
            limits: HostLimits::default(),
            read_buffer_bytes: 4096,
            swap: SwapPolicy::default(),
            request_head_timeout: Duration::from_secs(10),
            session: SessionPolicy::default(),
            auth: AuthConfig::default(),
            tls: None,
            cluster: None,
        }
    }
}

/// Why a host could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Manifests(Vec<ManifestError>),
    #[error(transparent)]
    Auth(#[from] crate::auth::SetupError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// A running host.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    hub: Arc<Hub>,
    shutdown: watch::Sender<bool>,
    tracker: TaskTracker,
    accept: JoinHandle<()>,
    watcher: Option<JoinHandle<()>>,
    supervisor: JoinHandle<()>,
    lifecycle: JoinHandle<()>,
}

impl Server {
    /// Loads the plugins, binds, and starts serving.
    pub async fn start(config: Config) -> Result<Server, StartError> {
        // Settings that contradict each other, keys and certificates fail first, before plugins
        // are loaded.
        let auth = Auth::new(&config.auth, config.session.dev_identity)?;
        let tls = config.tls.as_ref().map(tls::acceptor).transpose()?;
        let runtime = Runtime::new().context("starting the WASM runtime")?;
        let rooms = Arc::new(Rooms::default());
        let registry = Registry::load(
            &config.manifests,
            runtime,
            rooms.clone(),
            LoadOptions {
                build: config.build,
            },
            config.swap,
        )
        .await
        .map_err(StartError::Manifests)?;
        let listener = bind(config.listen).with_context(|| format!("binding {}", config.listen))?;
        let addr = listener.local_addr().context("reading the bound address")?;
        let (hub, due_rx) = Hub::new(registry, rooms, config.limits, config.session, auth);
        let hub = Arc::new(hub);
        hub.auth.log_startup();
        if config.session.dev_identity {
            tracing::warn!(
                "development identities are on: clients choose their identity with ?devIdentity=NAME; never use this in production"
            );
        }
        let (shutdown, shutdown_rx) = watch::channel(false);
        if let Some(cluster) = config.cluster.clone() {
            let manifests = Some(config.manifests.clone());
            let cluster =
                crate::cluster::Cluster::start(cluster, &hub, manifests, shutdown_rx.clone())
                    .map_err(|e| StartError::Other(e.into()))?;
            let _ = hub.cluster.set(cluster);
        }
        let tracker = TaskTracker::new();
        let mut ws_config = WebSocketConfig::default();
        ws_config.read_buffer_size = config.read_buffer_bytes;
        // Frames fed in one batch are written together (up to 16 KiB at a time), then flushed once.
        ws_config.write_buffer_size = 16 * 1024;
        ws_config.max_message_size = Some(config.limits.max_message_bytes.saturating_mul(4));
        ws_config.max_frame_size = Some(config.limits.max_message_bytes.saturating_mul(4));
        let ctx = Arc::new(Ctx {
            hub: hub.clone(),
            shutdown: shutdown_rx.clone(),
            tracker: tracker.clone(),
            ws_config,
            // hyper adds it to the present instant.
            request_head_timeout: crate::timers::capped(config.request_head_timeout),
            tls,
        });
        let accept = tokio::spawn(accept_loop(listener, ctx, shutdown_rx.clone()));
        let supervisor = {
            let (hub, mut stop) = (hub.clone(), shutdown_rx.clone());
            tokio::spawn(async move { hub.registry.supervise(stopped(&mut stop)).await })
        };
        let lifecycle = tokio::spawn(lifecycle::run(hub.clone(), due_rx, shutdown_rx.clone()));
        // Timers and request outcomes: their calls are tracked like connections, so that
        // shutdown lets the calls in flight finish.
        tracker.spawn(crate::router::run_later(
            hub.clone(),
            tracker.clone(),
            shutdown_rx.clone(),
        ));
        let watcher = match config.watch {
            WatchMode::Off => None,
            mode => {
                Some(watcher::spawn(hub.clone(), mode, shutdown_rx).context("watching plugins")?)
            }
        };
        let scheme = if config.tls.is_some() { "wss" } else { "ws" };
        tracing::info!(%addr, scheme, plugins = ?hub.registry.table().versions(), "plexus listening");
        Ok(Server {
            addr,
            hub,
            shutdown,
            tracker,
            accept,
            watcher,
            supervisor,
            lifecycle,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Reload outcomes (swaps and rejections) as they happen.
    pub fn subscribe_reloads(&self) -> broadcast::Receiver<ReloadEvent> {
        self.hub.registry.subscribe()
    }

    /// Reloads the manifests directory now.
    pub async fn reload(&self) -> Vec<ReloadEvent> {
        self.hub.registry.reload().await
    }

    /// Rolls plugin `id` back to its previous version (kept warm for a while after a swap).
    pub async fn rollback(&self, id: &str) -> Result<ReloadEvent, RollbackError> {
        self.hub
            .registry
            .rollback(id, None, "requested by an operator", false)
            .await
    }

    /// Stops accepting, lets in-flight plugin calls finish, closes sockets with 1001.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        // Every connection finishes the message it is handling, writes what is queued, then
        // closes with 1001.
        self.hub.sessions.close_all(CloseReason::Shutdown);
        let _ = self.accept.await;
        if let Some(w) = self.watcher {
            let _ = w.await;
        }
        let _ = self.supervisor.await;
        self.tracker.close();
        self.tracker.wait().await;
        let _ = self.lifecycle.await;
        match self.hub.cluster.get() {
            // In a cluster the sessions outlive their node: their clients resume them on another
            // node (once this node's lease has ended, below), with every frame saved.
            Some(cluster) => cluster.leave().await,
            // Sessions still waiting for a resume end too (their rooms tell their plugins).
            None => {
                for session in self.hub.sessions.all() {
                    lifecycle::end_session(&self.hub, &session, lifecycle::End::Shutdown).await;
                }
            }
        }
    }
}

/// Connections the kernel queues before `accept`: a connect storm must not overflow it (the
/// default of 128 makes clients retry their SYN after a second).
const LISTEN_BACKLOG: u32 = 4096;

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Resolves once the host is shutting down.
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

struct Ctx {
    hub: Arc<Hub>,
    shutdown: watch::Receiver<bool>,
    tracker: TaskTracker,
    ws_config: WebSocketConfig,
    request_head_timeout: Duration,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

async fn accept_loop(listener: TcpListener, ctx: Arc<Ctx>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = crate::server::stopped(&mut shutdown) => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly, keep serving.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        let mut stop = ctx.shutdown.clone();
        ctx.tracker.clone().spawn(async move {
            let Some(acceptor) = ctx.tls.clone() else {
                serve_http(stream, ctx, peer, &mut stop).await;
                return;
            };
            // The TLS handshake has the request head's deadline too.
            let handshake = tokio::time::timeout(ctx.request_head_timeout, acceptor.accept(stream));
            let stream = tokio::select! {
                done = handshake => match done {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, "TLS handshake failed: {e}");
                        return;
                    }
                    Err(_) => return,
                },
                _ = crate::server::stopped(&mut stop) => return,
            };
            serve_http(stream, ctx, peer, &mut stop).await;
        });
    }
}

/// Serves HTTP/1.1 on one connection (plain TCP or TLS) until it ends or the host shuts down.
async fn serve_http<I>(io: I, ctx: Arc<Ctx>, peer: SocketAddr, stop: &mut watch::Receiver<bool>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service_ctx = ctx.clone();
    let service = hyper::service::service_fn(move |req| handle(req, service_ctx.clone(), peer));
    // A client that connects and never finishes its request head is dropped.
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(ctx.request_head_timeout)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::select! {
        _ = conn => {}
        _ = crate::server::stopped(stop) => {}
    }
}

fn text_response(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp
}

async fn handle(
    req: Request<Incoming>,
    ctx: Arc<Ctx>,
    peer: SocketAddr,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => healthz(&ctx.hub),
        (&Method::GET, "/ws") => upgrade(req, ctx, peer),
        (&Method::POST, "/admin/rollback") => admin_rollback(&req, &ctx.hub, peer).await,
        (_, "/healthz" | "/ws") => text_response(StatusCode::METHOD_NOT_ALLOWED, "use GET\n"),
        (_, "/admin/rollback") => text_response(StatusCode::METHOD_NOT_ALLOWED, "use POST\n"),
        _ => text_response(StatusCode::NOT_FOUND, "not found\n"),
    })
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = text_response(status, body.to_string());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn healthz(hub: &Hub) -> Response<Full<Bytes>> {
    use crate::protocol::unix_ms;
    let plugins: serde_json::Map<String, serde_json::Value> = hub
        .registry
        .report()
        .into_iter()
        .map(|p| {
            let previous = p.previous.map(|(version, until)| {
                serde_json::json!({ "version": version, "keptUntil": unix_ms(until) })
            });
            let rollback = p.last_rollback.map(|r| {
                serde_json::json!({
                    "from": r.from,
                    "to": r.to,
                    "reason": r.reason,
                    "automatic": r.automatic,
                    "at": unix_ms(r.at),
                })
            });
            let entry = serde_json::json!({
                "version": p.version,
                "interface": p.interface,
                "loadedAt": unix_ms(p.loaded_at),
                "calls": p.counts.calls,
                "failures": p.counts.failures,
                "inFlight": p.counts.in_flight,
                "probation": p.on_probation,
                "previous": previous,
                "lastRollback": rollback,
                "timers": p.timers,
                "requests": p.requests,
                "circuit": p.circuit.0.as_str(),
                "circuitTrips": p.circuit.1,
                "slowLane": p.slow,
            });
            (p.id, entry)
        })
        .collect();
    let refused: Vec<serde_json::Value> = hub
        .registry
        .refused()
        .into_iter()
        .map(|r| {
            serde_json::json!({
                "file": r.error.file.display().to_string(),
                "plugin": r.plugin,
                "candidate": r.candidate,
                "reason": r.error.to_string(),
                "at": unix_ms(r.at),
            })
        })
        .collect();
    let cluster = hub.cluster.get();
    let degraded = cluster.is_some_and(|c| !c.is_up());
    let body = serde_json::json!({
        "status": if degraded { "degraded" } else { "ok" },
        "cluster": cluster.map(|c| c.report()),
        "hostVersion": env!("CARGO_PKG_VERSION"),
        "protocolVersion": crate::protocol::PROTOCOL_VERSION,
        "interfaceVersion": crate::plugin::wasm::INTERFACE_VERSION,
        "connections": hub.sessions.all().iter().filter(|s| s.is_attached()).count(),
        "sessions": hub.sessions.len(),
        "rooms": hub.rooms.len(),
        "plugins": plugins,
        "refused": refused,
        "reloads": hub.registry.reloads(),
    });
    json_response(StatusCode::OK, &body)
}

/// `POST /admin/rollback?plugin=ID`: rolls a plugin back to its previous version. Served only
/// to clients on the host's own machine (a loopback address).
async fn admin_rollback(
    req: &Request<Incoming>,
    hub: &Hub,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    if !peer.ip().is_loopback() {
        return text_response(
            StatusCode::FORBIDDEN,
            "admin endpoints are served on loopback only\n",
        );
    }
    let plugin = req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("plugin="))
            .map(str::to_owned)
    });
    let Some(plugin) = plugin.filter(|p| !p.is_empty()) else {
        return json_response(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({ "error": "give the plugin: /admin/rollback?plugin=ID" }),
        );
    };
    match hub
        .registry
        .rollback(&plugin, None, "requested by an operator", false)
        .await
    {
        Ok(ReloadEvent::RolledBack { from, to, .. }) => json_response(
            StatusCode::OK,
            &serde_json::json!({ "plugin": plugin, "from": from, "to": to }),
        ),
        Ok(_) => text_response(StatusCode::INTERNAL_SERVER_ERROR, "unexpected outcome\n"),
        Err(e) => {
            let status = match e {
                RollbackError::UnknownPlugin(_) => StatusCode::NOT_FOUND,
                _ => StatusCode::CONFLICT,
            };
            json_response(status, &serde_json::json!({ "error": e.to_string() }))
        }
    }
}

fn header_has(req: &Request<Incoming>, name: header::HeaderName, token: &str) -> bool {
    req.headers().get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// 503 (the host is full) or 429 (this address or identity has as many connections as it may),
/// with a short JSON body naming the limit.
fn connection_limit_response(
    over: crate::limits::Over,
    limits: &crate::limits::ConnectionLimits,
) -> Response<Full<Bytes>> {
    use crate::limits::Over;
    let (status, reason, limit) = match over {
        Over::Total => (StatusCode::SERVICE_UNAVAILABLE, "host_full", limits.total),
        Over::Ip => (
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_from_address",
            limits.per_ip,
        ),
        Over::Identity => (
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_for_identity",
            limits.per_identity,
        ),
    };
    json_response(
        status,
        &serde_json::json!({
            "error": format!("connection limit reached ({limit})"),
            "reason": reason,
        }),
    )
}

/// The identity a client chose with `?devIdentity=NAME`, when the development setting allows it
/// (otherwise the parameter is ignored).
fn dev_identity(
    req: &Request<Incoming>,
    policy: &SessionPolicy,
) -> Result<Option<Identity>, &'static str> {
    if !policy.dev_identity {
        return Ok(None);
    }
    let Some(name) = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("devIdentity=")))
    else {
        return Ok(None);
    };
    let valid = |c: char| c.is_ascii_alphanumeric() || "._-@".contains(c);
    if name.is_empty() || name.len() > 128 || !name.chars().all(valid) {
        return Err("devIdentity must be 1 to 128 of A-Z a-z 0-9 . _ - @\n");
    }
    Ok(Some(Identity(Arc::from(name))))
}

fn upgrade(mut req: Request<Incoming>, ctx: Arc<Ctx>, peer: SocketAddr) -> Response<Full<Bytes>> {
    if !header_has(&req, header::CONNECTION, "upgrade")
        || !header_has(&req, header::UPGRADE, "websocket")
    {
        return text_response(
            StatusCode::UPGRADE_REQUIRED,
            "this endpoint speaks WebSocket\n",
        );
    }
    if req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v != "13")
    {
        return text_response(
            StatusCode::BAD_REQUEST,
            "Sec-WebSocket-Version must be 13\n",
        );
    }
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY) else {
        return text_response(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key\n");
    };
    if *ctx.shutdown.borrow() {
        return text_response(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    // Origin and token, before anything is upgraded: 403 or 401 with the reason.
    let admission = match ctx.hub.auth.admit(req.headers(), req.uri().query()) {
        Ok(admission) => admission,
        Err(refusal) => {
            tracing::debug!("upgrade refused: {refusal}");
            return refusal.response();
        }
    };
    // Development identities are never on while tokens are verified (`Auth::new`).
    let (identity, claims) = match dev_identity(&req, &ctx.hub.policy) {
        Ok(Some(identity)) => (identity, None),
        Ok(None) => (admission.identity, admission.claims),
        Err(message) => return text_response(StatusCode::BAD_REQUEST, message),
    };
    // Connection limits, before the upgrade: refusing is cheaper than serving.
    let slot = match ctx
        .hub
        .connections
        .admit(&ctx.hub.limits.connections, peer.ip(), &identity.0)
    {
        Ok(slot) => slot,
        Err(over) => return connection_limit_response(over, &ctx.hub.limits.connections),
    };
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    let task_ctx = ctx.clone();
    ctx.tracker.spawn(async move {
        // Counted until the connection ends.
        let _slot = slot;
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!("upgrade failed: {e}");
                return;
            }
        };
        let (hub, shutdown, config) = (
            task_ctx.hub.clone(),
            task_ctx.shutdown.clone(),
            Some(task_ctx.ws_config),
        );
        // The socket itself, out of hyper's type-erased wrapper: every read and write of the
        // connection's life skips a layer of dynamic dispatch. Bytes the client sent right
        // behind its upgrade request are handed to the WebSocket first.
        match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(hyper::upgrade::Parts { io, read_buf, .. }) => {
                // `read_buf` shares hyper's whole read buffer: copy what it holds and let the
                // buffer go before the connection's long life begins.
                let early = (!read_buf.is_empty()).then(|| read_buf.to_vec());
                drop(read_buf);
                let stream = io.into_inner();
                let ws = match early {
                    None => WebSocketStream::from_raw_socket(stream, Role::Server, config).await,
                    Some(early) => {
                        WebSocketStream::from_partially_read(stream, early, Role::Server, config)
                            .await
                    }
                };
                connection::serve(hub, ws, identity, claims, shutdown).await;
            }
            Err(upgraded) => {
                let ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, config)
                        .await;
                connection::serve(hub, ws, identity, claims, shutdown).await;
            }
        }
    });
    let mut resp = text_response(StatusCode::SWITCHING_PROTOCOLS, Bytes::new());
    let headers = resp.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    // Only the protocol the host speaks, never the client's token entry.
    if let Some(protocol) = admission.protocol {
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    resp
}
