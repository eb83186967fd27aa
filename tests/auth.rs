//! Who may connect, over real sockets: JWT verification (HS256, RS256, ES256 from a PEM file or
//! a JWKS file) with each refusal's 401 reason, the token from the query, the Authorization
//! header or the subprotocol, guests, development identities refused with a key, a token
//! expiring on a live connection (closed with 4401, or kept by `sys.refresh`), resumes across
//! identities, the Origin allow-list (403) and `wss://` with a certificate made by the test.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use plexus::auth::{AuthConfig, KeySource};
use plexus::{Config, Server, StartError};
use serde_json::{Value, json};
use support::{
    Client, Host, SECRET, TempDir, claims, echo_manifest, hs256, hs256_with, now, within,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn fixture(name: &str) -> PathBuf {
    support::repo_root().join("tests/fixtures/auth").join(name)
}

fn rs256(claims: &Value, kid: Option<&str>) -> String {
    let pem = std::fs::read(fixture("rs256-private.pem")).expect("the RSA test key");
    let mut header = Header::new(Algorithm::RS256);
    header.kid = kid.map(str::to_owned);
    let key = EncodingKey::from_rsa_pem(&pem).expect("an RSA key");
    jsonwebtoken::encode(&header, claims, &key).expect("signing")
}

fn es256(claims: &Value, kid: Option<&str>) -> String {
    let pem = std::fs::read(fixture("es256-private.pem")).expect("the EC test key");
    let mut header = Header::new(Algorithm::ES256);
    header.kid = kid.map(str::to_owned);
    let key = EncodingKey::from_ec_pem(&pem).expect("an EC key");
    jsonwebtoken::encode(&header, claims, &key).expect("signing")
}

/// A host verifying tokens with `key`, no leeway, after `tweak`.
async fn host_with(key: KeySource, tweak: impl FnOnce(&mut AuthConfig)) -> Host {
    Host::start_with(&[("echo.toml", echo_manifest())], |c: &mut Config| {
        c.auth.key = Some(key);
        c.auth.leeway_secs = 0;
        tweak(&mut c.auth);
    })
    .await
}

async fn hs256_host() -> Host {
    host_with(KeySource::Hs256Secret(SECRET.to_vec()), |_| {}).await
}

/// An HTTP answer to a WebSocket upgrade request that was refused.
#[derive(Debug)]
struct Refused {
    status: u16,
    head: String,
    body: Value,
}

/// Sends a WebSocket upgrade request for `path` with `headers` over `io` and reads an answer
/// that must not be `101`.
async fn refused_over<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    path: &str,
    headers: &[(&str, &str)],
) -> Refused {
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    within("the upgrade's answer", async {
        io.write_all(request.as_bytes()).await.expect("sending");
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = io.read(&mut buf).await.expect("reading");
            assert!(n > 0, "the host closed without an answer");
            raw.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&raw).into_owned();
            let Some((head, body)) = text.split_once("\r\n\r\n") else {
                continue;
            };
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (n, v) = l.split_once(':')?;
                    n.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if body.len() < length {
                continue;
            }
            let status: u16 = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .expect("a status");
            assert_ne!(status, 101, "the upgrade was accepted: {head}");
            return Refused {
                status,
                head: head.to_owned(),
                body: serde_json::from_str(body)
                    .unwrap_or_else(|e| panic!("a JSON body, got {body:?}: {e}")),
            };
        }
    })
    .await
}

async fn refused(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Refused {
    let tcp = TcpStream::connect(addr).await.expect("connecting");
    refused_over(tcp, path, headers).await
}

/// Asserts a 401 with `reason`.
async fn assert_401(addr: SocketAddr, path: &str, headers: &[(&str, &str)], reason: &str) {
    let r = refused(addr, path, headers).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.body["reason"], reason, "{r:?}");
    assert!(
        r.body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{r:?}"
    );
    assert!(
        r.head
            .to_ascii_lowercase()
            .contains("www-authenticate: bearer")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_token_is_refused_with_its_reason_before_the_upgrade() {
    let host = host_with(KeySource::Hs256Secret(SECRET.to_vec()), |a| {
        a.audience = Some("plexus".into());
        a.issuer = Some("https://issuer.example".into());
    })
    .await;
    let addr = host.addr();
    let good = |extra: Value| {
        let mut extra = extra;
        for (k, v) in [("aud", "plexus"), ("iss", "https://issuer.example")] {
            if extra.get(k).is_none() {
                extra[k] = json!(v);
            }
        }
        hs256(&claims("alice", extra))
    };
    assert_401(addr, "/ws", &[], "missing_token").await;
    assert_401(addr, "/ws?token=not.a.jwt", &[], "malformed_token").await;
    assert_401(addr, "/ws?token=abc", &[], "malformed_token").await;
    let forged = hs256_with(
        b"another secret",
        &claims("alice", json!({"aud": "plexus"})),
    );
    assert_401(addr, &format!("/ws?token={forged}"), &[], "bad_signature").await;
    let expired = good(json!({ "exp": now() - 120 }));
    assert_401(addr, &format!("/ws?token={expired}"), &[], "expired").await;
    let early = good(json!({ "nbf": now() + 3600 }));
    assert_401(addr, &format!("/ws?token={early}"), &[], "not_yet_valid").await;
    let elsewhere = good(json!({ "aud": "another-service" }));
    assert_401(
        addr,
        &format!("/ws?token={elsewhere}"),
        &[],
        "wrong_audience",
    )
    .await;
    let stranger = good(json!({ "iss": "https://evil.example" }));
    assert_401(addr, &format!("/ws?token={stranger}"), &[], "wrong_issuer").await;
    let no_sub =
        hs256(&json!({ "exp": now() + 60, "aud": "plexus", "iss": "https://issuer.example" }));
    assert_401(addr, &format!("/ws?token={no_sub}"), &[], "malformed_token").await;
    // An RS256 token to an HS256 host.
    let other_alg = rs256(&claims("alice", json!({"aud": "plexus"})), None);
    assert_401(
        addr,
        &format!("/ws?token={other_alg}"),
        &[],
        "bad_signature",
    )
    .await;
    // The same refusals through the header.
    let bearer = format!("Bearer {expired}");
    assert_401(addr, "/ws", &[("Authorization", &bearer)], "expired").await;

    // A good token is admitted, and its `sub` is the identity.
    let token = good(json!({}));
    let mut c = Client::connect_to(addr, &format!("/ws?token={token}")).await;
    assert_eq!(c.identity, "alice");
    c.echo_round_trip().await;
    let session = host
        .server
        .hub()
        .sessions
        .get(&c.connection_id)
        .expect("the session");
    let claims = session.claims().expect("verified claims on the session");
    assert_eq!(&*claims.sub, "alice");
    assert_eq!(claims.all["iss"], "https://issuer.example");
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_come_from_the_authorization_header_and_the_subprotocol() {
    let host = hs256_host().await;
    let token = hs256(&claims("bob", json!({})));

    let mut req = format!("ws://{}/ws", host.addr())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    let (mut ws, _) = within("the handshake", tokio_tungstenite::connect_async(req))
        .await
        .expect("admitted with the Authorization header");
    let welcome = next_json(&mut ws).await;
    assert_eq!(welcome["payload"]["identity"], "bob", "{welcome}");

    // A browser's way: the subprotocols `plexus.v1, bearer.<token>`; the host answers with
    // `plexus.v1` only.
    let mut req = format!("ws://{}/ws", host.addr())
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        format!("plexus.v1, bearer.{token}").parse().unwrap(),
    );
    let (mut ws, resp) = within("the handshake", tokio_tungstenite::connect_async(req))
        .await
        .expect("admitted with the subprotocol");
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok()),
        Some("plexus.v1"),
        "{resp:?}"
    );
    let welcome = next_json(&mut ws).await;
    assert_eq!(welcome["payload"]["identity"], "bob", "{welcome}");

    // A bad token through the subprotocol is refused like any other.
    let offered = format!(
        "plexus.v1, bearer.{}",
        hs256_with(b"wrong", &claims("bob", json!({})))
    );
    assert_401(
        host.addr(),
        "/ws",
        &[("Sec-WebSocket-Protocol", &offered)],
        "bad_signature",
    )
    .await;
}

async fn next_json<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut tokio_tungstenite::WebSocketStream<S>,
) -> Value {
    use futures_util::StreamExt;
    within("a frame", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).expect("JSON"),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_and_es256_keys_from_pem_and_jwks_files() {
    let rsa = host_with(KeySource::PublicKeyPem(fixture("rs256-public.pem")), |_| {}).await;
    let token = rs256(&claims("rita", json!({})), None);
    let c = Client::connect_to(rsa.addr(), &format!("/ws?token={token}")).await;
    assert_eq!(c.identity, "rita");
    let es_token = es256(&claims("rita", json!({})), None);
    assert_401(
        rsa.addr(),
        &format!("/ws?token={es_token}"),
        &[],
        "bad_signature",
    )
    .await;

    let ec = host_with(KeySource::PublicKeyPem(fixture("es256-public.pem")), |_| {}).await;
    let c = Client::connect_to(ec.addr(), &format!("/ws?token={es_token}")).await;
    assert_eq!(c.identity, "rita");
    assert_401(
        ec.addr(),
        &format!("/ws?token={token}"),
        &[],
        "bad_signature",
    )
    .await;

    let jwks = host_with(KeySource::Jwks(fixture("jwks.json")), |_| {}).await;
    for token in [
        rs256(&claims("kim", json!({})), Some("rsa-1")),
        es256(&claims("kim", json!({})), Some("ec-1")),
    ] {
        let c = Client::connect_to(jwks.addr(), &format!("/ws?token={token}")).await;
        assert_eq!(c.identity, "kim");
    }
    // No kid, an unknown kid, or a kid of a key of another type.
    for token in [
        rs256(&claims("kim", json!({})), None),
        rs256(&claims("kim", json!({})), Some("rsa-2")),
        rs256(&claims("kim", json!({})), Some("ec-1")),
    ] {
        assert_401(
            jwks.addr(),
            &format!("/ws?token={token}"),
            &[],
            "bad_signature",
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_need_no_key_and_are_refused_once_a_key_is_configured() {
    let logs = support::logs();
    // No key: everyone is a guest, tokens or not, and the start-up log says so.
    let open = Host::start(&[("echo.toml", echo_manifest())]).await;
    let c = open.client().await;
    assert!(c.identity.starts_with("guest-"), "{}", c.identity);
    let token = hs256(&claims("zoe", json!({})));
    let c = Client::connect_to(open.addr(), &format!("/ws?token={token}")).await;
    assert!(c.identity.starts_with("guest-"), "{}", c.identity);
    assert!(
        !logs
            .lines_with("every client is admitted as an anonymous guest")
            .is_empty()
    );

    let strict = hs256_host().await;
    assert_401(strict.addr(), "/ws", &[], "missing_token").await;

    let lenient = host_with(KeySource::Hs256Secret(SECRET.to_vec()), |a| {
        a.allow_guests = true;
    })
    .await;
    let guest = lenient.client().await;
    assert!(guest.identity.starts_with("guest-"), "{}", guest.identity);
    assert!(!logs.lines_with("(auth.allow_guests)").is_empty());
    // A token is still verified when one is sent.
    assert_401(lenient.addr(), "/ws?token=abc", &[], "malformed_token").await;
    let token = hs256(&claims("carol", json!({})));
    let c = Client::connect_to(lenient.addr(), &format!("/ws?token={token}")).await;
    assert_eq!(c.identity, "carol");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn development_identities_are_refused_at_start_with_a_key() {
    let dir = TempDir::new();
    let mut config = Config::new(dir.path());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.build = false;
    config.watch = plexus::WatchMode::Off;
    config.session.dev_identity = true;
    config.auth.key = Some(KeySource::Hs256Secret(SECRET.to_vec()));
    let err = match Server::start(config).await {
        Ok(_) => panic!("a host started with development identities and a key"),
        Err(e) => e,
    };
    assert!(matches!(err, StartError::Auth(_)), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("session.dev_identity"), "{text}");
    assert!(text.contains("--dev-insecure-identity"), "{text}");
    assert!(text.contains("auth.hs256_secret_file"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_closes_its_live_connection_with_4401() {
    let host = hs256_host().await;
    // Valid for one to two seconds from now.
    let token = hs256(&claims("dave", json!({ "exp": now() + 2 })));
    let mut c = Client::connect_to(host.addr(), &format!("/ws?token={token}")).await;
    c.sync().await;
    let (before, close) = c.closed().await;
    assert!(before.is_empty(), "{before:?}");
    let close = close.expect("a close frame");
    assert_eq!(u16::from(close.code), 4401, "{close:?}");
    assert_eq!(close.reason.as_str(), "token expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sys_refresh_with_a_new_token_keeps_the_connection_open_past_the_old_expiry() {
    let host = hs256_host().await;
    let first_exp = now() + 2;
    let token = hs256(&claims("erin", json!({ "exp": first_exp })));
    let mut c = Client::connect_to(host.addr(), &format!("/ws?token={token}")).await;

    // Refusals change nothing: another sub, a bad token, no token.
    let other = hs256(&claims("mallory", json!({ "exp": now() + 3600 })));
    c.expect_error(
        json!({ "type": "sys.refresh", "payload": { "token": other } }),
        "forbidden",
    )
    .await;
    let forged = hs256_with(b"wrong", &claims("erin", json!({})));
    let err = c
        .expect_error(
            json!({ "type": "sys.refresh", "payload": { "token": forged } }),
            "bad_token",
        )
        .await;
    assert!(
        support::str_at(&err, "/payload/message").starts_with("bad_signature"),
        "{err}"
    );
    c.expect_error(json!({ "type": "sys.refresh", "payload": {} }), "bad_frame")
        .await;

    // A valid token for the same sub, expiring three seconds after the first.
    let second_exp = first_exp + 3;
    let fresh = hs256(&claims("erin", json!({ "exp": second_exp })));
    let ack = c
        .ack(json!({ "type": "sys.refresh", "payload": { "token": fresh } }))
        .await;
    assert_eq!(ack["payload"]["exp"], second_exp, "{ack}");
    c.echo_round_trip().await;

    // The connection closes at the new expiry, not at the first one.
    let (_, close) = c.closed().await;
    let closed_at = now();
    let close = close.expect("a close frame");
    assert_eq!(u16::from(close.code), 4401, "{close:?}");
    assert!(
        closed_at >= second_exp,
        "closed at {closed_at}, before the refreshed expiry {second_exp}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_resumed_only_by_its_own_identity() {
    let host = hs256_host().await;
    let alice = hs256(&claims("alice", json!({})));
    let mut a = Client::connect_to(host.addr(), &format!("/ws?token={alice}")).await;
    a.sync().await;
    let (session_id, resume_token, last_seq) =
        (a.session_id.clone(), a.resume_token.clone(), a.last_seq);
    a.drop_connection();

    // Mallory holds Alice's resume token, and a valid token of her own.
    let mallory = hs256(&claims("mallory", json!({})));
    let mut m = Client::connect_to(host.addr(), &format!("/ws?token={mallory}")).await;
    let id = m.next_id();
    m.send(json!({
        "type": "sys.resume",
        "messageId": id,
        "payload": { "sessionId": session_id, "resumeToken": resume_token, "lastSeq": last_seq },
    }))
    .await;
    let (_, answer) = m.answer_to(&id).await;
    support::assert_error(&answer, "forbidden", Some(&id));
    assert_eq!(m.identity, "mallory");

    // Alice herself, on a new connection with a new token, resumes it.
    let alice_again = hs256(&claims("alice", json!({ "jti": "second" })));
    let mut b = Client::connect_to(host.addr(), &format!("/ws?token={alice_again}")).await;
    let id = b.next_id();
    // A resumed session's frames continue its sequence.
    b.last_seq = last_seq;
    b.send(json!({
        "type": "sys.resume",
        "messageId": id,
        "payload": { "sessionId": session_id, "resumeToken": resume_token, "lastSeq": last_seq },
    }))
    .await;
    let (_, answer) = b.answer_to(&id).await;
    assert_eq!(answer["type"], "sys.ack", "{answer}");
    let session = host
        .server
        .hub()
        .sessions
        .find(&session_id)
        .expect("the session");
    assert_eq!(session.claims().expect("claims").all["jti"], "second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_from_an_origin_not_on_the_list_gets_403() {
    let host = Host::start_with(&[("echo.toml", echo_manifest())], |c| {
        c.auth.allowed_origins = vec!["https://app.example".into()];
    })
    .await;
    let r = refused(host.addr(), "/ws", &[("Origin", "https://evil.example")]).await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.body["reason"], "origin_not_allowed", "{r:?}");

    let mut req = format!("ws://{}/ws", host.addr())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Origin", "https://app.example".parse().unwrap());
    let (mut ws, _) = within("the handshake", tokio_tungstenite::connect_async(req))
        .await
        .expect("an allowed origin is admitted");
    assert_eq!(next_json(&mut ws).await["type"], "sys.welcome");
    // Not a browser (no Origin header): admitted.
    host.client().await.echo_round_trip().await;
}

/// A self-signed certificate for `localhost` and 127.0.0.1, written as PEM files in `dir`.
fn certificate(dir: &TempDir) -> (PathBuf, PathBuf, rustls_pki_types::CertificateDer<'static>) {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
            .expect("a certificate");
    let cert_path = dir.write("cert.pem", cert.pem());
    let key_path = dir.write("key.pem", signing_key.serialize_pem());
    (cert_path, key_path, cert.der().clone())
}

async fn tls_connect(
    addr: SocketAddr,
    cert: &rustls_pki_types::CertificateDer<'static>,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).expect("a trusted certificate");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.expect("connecting");
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    within("the TLS handshake", connector.connect(name, tcp))
        .await
        .expect("the TLS handshake")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wss_session_with_a_certificate_made_by_the_test() {
    let certs = TempDir::new();
    let (cert_path, key_path, cert) = certificate(&certs);
    let host = Host::start_with(&[("echo.toml", echo_manifest())], |c| {
        c.tls = Some(plexus::edge::tls::TlsFiles {
            cert: cert_path,
            key: key_path,
        });
        c.auth.key = Some(KeySource::Hs256Secret(SECRET.to_vec()));
    })
    .await;
    let token = hs256(&claims("tess", json!({})));

    let tls = tls_connect(host.addr(), &cert).await;
    let url = format!("wss://localhost:{}/ws?token={token}", host.addr().port());
    let (ws, _) = within("the handshake", tokio_tungstenite::client_async(url, tls))
        .await
        .expect("a WebSocket over TLS");
    let mut ws = ws;
    let welcome = next_json(&mut ws).await;
    assert_eq!(welcome["payload"]["identity"], "tess", "{welcome}");
    use futures_util::SinkExt;
    ws.send(Message::text(
        json!({"type": "echo", "messageId": "e1", "payload": {"over": "tls"}}).to_string(),
    ))
    .await
    .unwrap();
    let echo = next_json(&mut ws).await;
    assert_eq!(echo["type"], "echo", "{echo}");
    assert_eq!(echo["payload"]["over"], "tls");
    assert_eq!(next_json(&mut ws).await["type"], "sys.ack");

    // Refusals and /healthz are served over TLS too.
    let tls = tls_connect(host.addr(), &cert).await;
    let r = refused_over(tls, "/ws", &[]).await;
    assert_eq!(r.status, 401);
    let mut tls = tls_connect(host.addr(), &cert).await;
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    let _ = within("/healthz over TLS", tls.read_to_end(&mut raw)).await;
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(raw.contains("\"status\":\"ok\""), "{raw}");

    // A plain-text client gets no WebSocket.
    let plain = tokio_tungstenite::connect_async(format!("ws://{}/ws?token={token}", host.addr()));
    assert!(within("a plain handshake", plain).await.is_err());
}

#[test]
fn the_fixture_keys_are_where_the_tests_look() {
    for name in [
        "rs256-private.pem",
        "rs256-public.pem",
        "es256-private.pem",
        "es256-public.pem",
        "jwks.json",
    ] {
        assert!(Path::new(&fixture(name)).is_file(), "{name}");
    }
}
