//! Who may connect: JWT verification (HS256, RS256, ES256 from a secret, a PEM file or a JWKS
//! file), where a client's token is read from, guests, the Origin allow-list, `sys.refresh`, and
//! the one mapping of every refusal to its HTTP answer (see docs/protocol.md, "Authentication");
//! and which rooms a session may join by its claims ([`rules`]).

mod keys;
mod ring_verify;
pub mod rules;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Response, StatusCode};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use crate::error::{ErrorCode, HandleError};
use crate::session::{Identity, Session};

pub use keys::KeyError;
pub use rules::{ClaimValue, Denied, RoomRule, RoomRules, RuleError};

/// The WebSocket subprotocol this host speaks, answered in `Sec-WebSocket-Protocol` when a
/// client offers it.
pub const SUBPROTOCOL: &str = "plexus.v1";
/// The prefix of the subprotocol entry that carries a token: `bearer.<token>`.
pub const BEARER_PROTOCOL_PREFIX: &str = "bearer.";
/// The longest `sub` the host accepts as an identity, in bytes.
pub const MAX_SUBJECT_BYTES: usize = 256;

/// Where the keys that verify tokens come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// HS256 with this shared secret.
    Hs256Secret(Vec<u8>),
    /// HS256 with the secret in this file (its bytes, less a trailing newline).
    Hs256SecretFile(PathBuf),
    /// A public key in PEM: RS256 for an RSA key, ES256 for a P-256 key.
    PublicKeyPem(PathBuf),
    /// A JWKS document (`{"keys": [...]}`) of RSA (RS256) and P-256 (ES256) keys; a token names
    /// its key by `kid`.
    Jwks(PathBuf),
}

/// Who may connect (docs/operations.md, "Authentication and access").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// The keys tokens are verified with. `None`: no verification, every client is a guest.
    pub key: Option<KeySource>,
    /// When set, a token's `aud` must contain it.
    pub audience: Option<String>,
    /// When set, a token's `iss` must be it.
    pub issuer: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds. A live connection is closed this long
    /// after its token's `exp`.
    pub leeway_secs: u64,
    /// With a key configured, still admit clients without a token as guests.
    pub allow_guests: bool,
    /// Origins a browser connection (one with an `Origin` header) may come from; empty: any.
    pub allowed_origins: Vec<String>,
    /// Which sessions may join which rooms, by their claims; empty: every room is open.
    pub room_rules: RoomRules,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            key: None,
            audience: None,
            issuer: None,
            leeway_secs: 5,
            allow_guests: false,
            allowed_origins: Vec::new(),
            room_rules: RoomRules::default(),
        }
    }
}

/// Why a host with this configuration cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(
        "the development identity setting (session.dev_identity, --dev-insecure-identity) is refused while a token key is configured (auth.hs256_secret_file, auth.public_key_file or auth.jwks_file; --jwt-secret-file, --jwt-public-key or --jwt-jwks): turn one of them off"
    )]
    DevIdentityWithKey,
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// Why a token was refused. Each is one `reason` of the HTTP 401 body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error(
        "a token is required: send it as ?token=, Authorization: Bearer, or the bearer.<token> subprotocol"
    )]
    Missing,
    #[error("the token is malformed: {0}")]
    Malformed(String),
    #[error("the token's signature does not verify: {0}")]
    BadSignature(String),
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token is not for this audience")]
    WrongAudience,
    #[error("the token is not from the expected issuer")]
    WrongIssuer,
}

impl TokenError {
    /// The `reason` as it appears in a 401 body.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Missing => "missing_token",
            TokenError::Malformed(_) => "malformed_token",
            TokenError::BadSignature(_) => "bad_signature",
            TokenError::Expired => "expired",
            TokenError::NotYetValid => "not_yet_valid",
            TokenError::WrongAudience => "wrong_audience",
            TokenError::WrongIssuer => "wrong_issuer",
        }
    }

    fn of(err: &jsonwebtoken::errors::Error) -> TokenError {
        match err.kind() {
            ErrorKind::ExpiredSignature => TokenError::Expired,
            ErrorKind::ImmatureSignature => TokenError::NotYetValid,
            ErrorKind::InvalidAudience => TokenError::WrongAudience,
            ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
            ErrorKind::InvalidSignature => TokenError::BadSignature("no key verifies it".into()),
            ErrorKind::InvalidAlgorithm => {
                TokenError::BadSignature("its algorithm is not the key's".into())
            }
            ErrorKind::InvalidEcdsaKey | ErrorKind::InvalidRsaKey(_) => {
                TokenError::BadSignature("the key does not fit its algorithm".into())
            }
            ErrorKind::MissingRequiredClaim(claim) => {
                TokenError::Malformed(format!("the `{claim}` claim is missing"))
            }
            ErrorKind::InvalidClaimFormat(claim) => {
                TokenError::Malformed(format!("the `{claim}` claim has the wrong type"))
            }
            other => TokenError::Malformed(format!("{other:?}")),
        }
    }
}

/// Why a connection was refused before its upgrade.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("origin `{0}` is not allowed")]
    Origin(String),
}

impl Refusal {
    /// The HTTP answer to a refused upgrade: 401 with the token's reason, or 403 for an Origin
    /// not on the list. The one place a refusal becomes a status.
    pub fn response(&self) -> Response<Full<Bytes>> {
        let (status, reason) = match self {
            Refusal::Token(e) => (StatusCode::UNAUTHORIZED, e.reason()),
            Refusal::Origin(_) => (StatusCode::FORBIDDEN, "origin_not_allowed"),
        };
        let body = serde_json::json!({ "error": self.to_string(), "reason": reason });
        let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
        *resp.status_mut() = status;
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"plexus\""),
            );
        }
        resp
    }
}

/// The verified claims of a client's token.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims {
    /// The identity: the `sub` claim.
    pub sub: Arc<str>,
    /// The `exp` claim, in Unix seconds.
    pub exp: u64,
    /// When a live connection presenting this token is closed: `exp` plus the leeway, in
    /// Unix seconds.
    pub valid_until: u64,
    /// Every claim of the token, as it was signed.
    pub all: Map<String, Value>,
}

/// The verification keys and rules of a host, built once at start.
#[derive(Debug)]
pub struct Auth {
    keys: Option<keys::Keys>,
    validation: HashMap<Algorithm, Validation>,
    leeway: u64,
    allow_guests: bool,
    origins: Vec<String>,
    room_rules: RoomRules,
}

/// Who a connection is, once admitted.
#[derive(Debug)]
pub struct Admission {
    pub identity: Identity,
    /// The verified claims; `None` for a guest or a development identity.
    pub claims: Option<Arc<Claims>>,
    /// The `Sec-WebSocket-Protocol` to answer with, when the client offered [`SUBPROTOCOL`].
    pub protocol: Option<HeaderValue>,
}

impl Default for Auth {
    /// No verification: every client is a guest.
    fn default() -> Self {
        match Auth::new(&AuthConfig::default(), false) {
            Ok(auth) => auth,
            Err(e) => unreachable!("no key, no error: {e}"),
        }
    }
}

impl Auth {
    /// Loads the keys and checks the settings against each other. `dev_identity` is the
    /// session setting that lets clients choose their identity.
    pub fn new(config: &AuthConfig, dev_identity: bool) -> Result<Auth, SetupError> {
        let keys = config.key.as_ref().map(keys::Keys::load).transpose()?;
        if keys.is_some() {
            ring_verify::install();
        }
        if keys.is_some() && dev_identity {
            return Err(SetupError::DevIdentityWithKey);
        }
        let mut validation = HashMap::new();
        for alg in [Algorithm::HS256, Algorithm::RS256, Algorithm::ES256] {
            let mut v = Validation::new(alg);
            v.leeway = config.leeway_secs;
            v.validate_exp = true;
            v.validate_nbf = true;
            v.set_required_spec_claims(&["exp", "sub"]);
            match &config.audience {
                Some(aud) => v.set_audience(&[aud]),
                None => v.validate_aud = false,
            }
            if let Some(iss) = &config.issuer {
                v.set_issuer(&[iss]);
            }
            validation.insert(alg, v);
        }
        Ok(Auth {
            keys,
            validation,
            leeway: config.leeway_secs,
            allow_guests: config.allow_guests,
            origins: config
                .allowed_origins
                .iter()
                .map(|o| normalize_origin(o))
                .collect(),
            room_rules: config.room_rules.clone(),
        })
    }

    /// Which sessions may join which rooms.
    pub fn room_rules(&self) -> &RoomRules {
        &self.room_rules
    }

    /// Whether tokens are verified (a key is configured).
    pub fn verifies(&self) -> bool {
        self.keys.is_some()
    }

    /// Whether clients without a token are admitted as guests.
    pub fn admits_guests(&self) -> bool {
        self.keys.is_none() || self.allow_guests
    }

    /// Says at start who may connect.
    pub fn log_startup(&self) {
        match (&self.keys, self.allow_guests) {
            (None, _) => tracing::warn!(
                "no token key configured: every client is admitted as an anonymous guest (configure auth.hs256_secret_file, auth.public_key_file or auth.jwks_file to require tokens)"
            ),
            (Some(keys), false) => {
                tracing::info!(keys = %keys.describe(), "tokens required: clients without a valid token are refused (401)")
            }
            (Some(keys), true) => tracing::info!(
                keys = %keys.describe(),
                "tokens verified; clients without a token are admitted as guests (auth.allow_guests)"
            ),
        }
        if !self.origins.is_empty() {
            tracing::info!(origins = ?self.origins, "browser connections only from these origins");
        }
        if !self.room_rules.is_empty() {
            tracing::info!(
                rules = self.room_rules.len(),
                "room rules: the first rule matching a room decides who may join it"
            );
        }
    }

    /// Verifies `token`: its signature, `exp`, `nbf`, and `aud`/`iss` when configured.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let Some(keys) = &self.keys else {
            return Err(TokenError::BadSignature(
                "this host has no key to verify tokens with".into(),
            ));
        };
        let header = jsonwebtoken::decode_header(token).map_err(|e| TokenError::of(&e))?;
        let (alg, key): (Algorithm, &DecodingKey) = keys.find(header.alg, header.kid.as_deref())?;
        let validation = self
            .validation
            .get(&alg)
            .ok_or_else(|| TokenError::BadSignature(format!("{alg:?} is not accepted")))?;
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, key, validation)
            .map_err(|e| TokenError::of(&e))?;
        let all = data.claims;
        let sub = match all.get("sub") {
            Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_SUBJECT_BYTES => s,
            _ => {
                return Err(TokenError::Malformed(format!(
                    "`sub` must be a string of 1 to {MAX_SUBJECT_BYTES} bytes"
                )));
            }
        };
        let exp = all
            .get("exp")
            .and_then(Value::as_u64)
            .ok_or_else(|| TokenError::Malformed("`exp` must be a whole number".into()))?;
        Ok(Claims {
            sub: Arc::from(sub.as_str()),
            exp,
            valid_until: exp.saturating_add(self.leeway),
            all,
        })
    }

    /// Decides whether an upgrade request may become a connection, and as whom. `dev` is the
    /// development identity the request asked for, if that setting is on.
    pub fn admit(&self, headers: &HeaderMap, query: Option<&str>) -> Result<Admission, Refusal> {
        if !self.origins.is_empty()
            && let Some(origin) = headers.get(header::ORIGIN)
        {
            let text = origin.to_str().unwrap_or("");
            if !self.origins.contains(&normalize_origin(text)) {
                return Err(Refusal::Origin(text.chars().take(200).collect()));
            }
        }
        let protocol = offers_subprotocol(headers).then(|| HeaderValue::from_static(SUBPROTOCOL));
        let token = token_of(headers, query)?;
        let (identity, claims) = match (token, self.verifies()) {
            (Some(token), true) => {
                let claims = self.verify(&token)?;
                (Identity(claims.sub.clone()), Some(Arc::new(claims)))
            }
            (None, true) if !self.allow_guests => return Err(TokenError::Missing.into()),
            // No key: tokens are not looked at; everyone is a guest.
            _ => (Identity::guest(), None),
        };
        Ok(Admission {
            identity,
            claims,
            protocol,
        })
    }

    /// `sys.refresh` `{"token"}`: replaces the session's claims with those of a new valid token
    /// for the same `sub`, postponing the close at expiry. Answers the ack's fields.
    pub fn refresh(&self, session: &Session, token: &str) -> Result<Option<String>, HandleError> {
        let Some(current) = session.claims() else {
            return Err(HandleError::new(
                ErrorCode::Forbidden,
                "this connection was not admitted with a token; there is nothing to refresh",
            ));
        };
        let claims = self.verify(token).map_err(|e| {
            HandleError::new(
                ErrorCode::BadToken,
                format!(
                    "{}: {e}; the connection keeps its current token",
                    e.reason()
                ),
            )
        })?;
        if claims.sub != current.sub {
            return Err(HandleError::new(
                ErrorCode::Forbidden,
                "the new token is for another `sub` than this connection's",
            ));
        }
        let exp = claims.exp;
        session.set_claims(Some(Arc::new(claims)));
        Ok(Some(
            serde_json::json!({ "exp": exp, "sub": &*current.sub }).to_string(),
        ))
    }
}

/// Handles `sys.refresh` for the router: reads `{"token": "..."}` and refreshes.
pub fn handle_refresh(
    auth: &Auth,
    session: &Session,
    payload: &serde_json::value::RawValue,
) -> Result<Option<String>, HandleError> {
    let token = crate::protocol::payload_token(payload)
        .map_err(|m| HandleError::new(ErrorCode::BadFrame, m))?;
    auth.refresh(session, &token)
}

/// Whether the connection of session `fresh` may resume `target`: when either was admitted
/// with a token, both must be the same identity. (The resumed session then carries the new
/// connection's claims, and so its expiry.)
pub fn check_resume(fresh: &Session, target: &Session) -> Result<(), HandleError> {
    let authenticated = fresh.claims().is_some() || target.claims().is_some();
    if authenticated && fresh.identity != target.identity {
        return Err(HandleError::new(
            ErrorCode::Forbidden,
            "that session belongs to another identity",
        ));
    }
    Ok(())
}

/// The instant a live connection whose claims are valid until `valid_until` (Unix seconds) is
/// closed.
pub fn deadline(valid_until: u64) -> tokio::time::Instant {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let left = Duration::from_secs(valid_until).saturating_sub(now);
    tokio::time::Instant::now() + crate::timers::capped(left)
}

/// The token a request carries, looked for in this order: `Authorization: Bearer`, the
/// `bearer.<token>` entry of `Sec-WebSocket-Protocol`, the `token` query parameter.
pub fn token_of(headers: &HeaderMap, query: Option<&str>) -> Result<Option<String>, TokenError> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let text = value
            .to_str()
            .map_err(|_| TokenError::Malformed("the Authorization header is not text".into()))?;
        let (scheme, token) = text.trim().split_once(' ').ok_or_else(|| {
            TokenError::Malformed("Authorization must be `Bearer <token>`".into())
        })?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(TokenError::Malformed(
                "Authorization must be `Bearer <token>`".into(),
            ));
        }
        return Ok(Some(token.trim().to_owned()));
    }
    for value in headers.get_all(header::SEC_WEBSOCKET_PROTOCOL) {
        let Ok(text) = value.to_str() else { continue };
        if let Some(token) = text
            .split(',')
            .map(str::trim)
            .find_map(|p| p.strip_prefix(BEARER_PROTOCOL_PREFIX))
        {
            return Ok(Some(token.to_owned()));
        }
    }
    Ok(query
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")))
        .map(str::to_owned))
}

/// Whether the client offered the subprotocol this host speaks.
fn offers_subprotocol(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|t| t.split(','))
        .any(|p| p.trim() == SUBPROTOCOL)
}

/// An origin as compared: lowercase, without a trailing slash.
fn normalize_origin(origin: &str) -> String {
    origin.trim().trim_end_matches('/').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn an_expiry_too_far_for_the_clock_is_never() {
        // A token's `exp` plus `leeway_secs = 9223372036854775807`, or an `exp` that far.
        for valid_until in [i64::MAX as u64 + 1_000_000_000, u64::MAX] {
            let at = deadline(valid_until);
            assert!(at > tokio::time::Instant::now() + crate::timers::FOREVER / 2);
        }
    }

    #[test]
    fn the_token_is_read_from_each_place_in_order() {
        let h = headers(&[("authorization", "Bearer abc")]);
        assert_eq!(
            token_of(&h, Some("token=q")).unwrap().as_deref(),
            Some("abc")
        );
        let h = headers(&[("sec-websocket-protocol", "plexus.v1, bearer.xyz")]);
        assert_eq!(token_of(&h, None).unwrap().as_deref(), Some("xyz"));
        assert!(offers_subprotocol(&h));
        assert_eq!(
            token_of(&HeaderMap::new(), Some("a=1&token=q"))
                .unwrap()
                .as_deref(),
            Some("q")
        );
        assert_eq!(token_of(&HeaderMap::new(), None).unwrap(), None);
        let h = headers(&[("authorization", "Basic abc")]);
        assert_eq!(token_of(&h, None).unwrap_err().reason(), "malformed_token");
    }

    #[test]
    fn dev_identity_is_refused_with_a_key() {
        let config = AuthConfig {
            key: Some(KeySource::Hs256Secret(b"secret".to_vec())),
            ..AuthConfig::default()
        };
        let err = Auth::new(&config, true).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("session.dev_identity"), "{text}");
        assert!(text.contains("auth.hs256_secret_file"), "{text}");
        assert!(Auth::new(&AuthConfig::default(), true).is_ok());
    }

    #[test]
    fn origins_compare_without_case_or_trailing_slash() {
        let auth = Auth::new(
            &AuthConfig {
                allowed_origins: vec!["https://App.example/".into()],
                ..AuthConfig::default()
            },
            false,
        )
        .unwrap();
        let ok = headers(&[("origin", "https://app.example")]);
        assert!(auth.admit(&ok, None).is_ok());
        let bad = headers(&[("origin", "https://evil.example")]);
        assert!(matches!(auth.admit(&bad, None), Err(Refusal::Origin(_))));
        // Not a browser: no Origin header, no check.
        assert!(auth.admit(&HeaderMap::new(), None).is_ok());
    }
}
