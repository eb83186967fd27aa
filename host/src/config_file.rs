//! `plexus.toml`: the host's settings in a file, strict like manifests (an unknown key or a
//! wrong type is an error naming the file and the line), as one [`Settings`] that command-line
//! flags override (docs/operations.md, "plexus.toml").

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use std::num::NonZeroU32;

use crate::auth::{ClaimValue, KeySource, RoomRule, RoomRules};
use crate::edge::tls::TlsFiles;
use crate::limits::RateLimit;
use crate::server::Config;

/// The file `plexus serve` reads from its working directory when `--config` is not given.
pub const DEFAULT_FILE: &str = "plexus.toml";

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigFileError {
    pub file: PathBuf,
    /// 1-based line, when the problem has a place in the file.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file.display(), line, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

/// Every setting of `plexus serve`, each optional: what a file or the flags set. Applied over
/// [`Config`]'s defaults, the file's first, then the flags'.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    pub listen: Option<SocketAddr>,
    pub manifests: Option<PathBuf>,
    pub build: Option<bool>,
    pub max_message_bytes: Option<usize>,
    pub max_json_depth: Option<usize>,
    pub max_json_array: Option<usize>,
    pub max_rooms_per_connection: Option<usize>,
    pub max_room_members: Option<usize>,
    pub max_connections: Option<usize>,
    pub max_connections_per_ip: Option<usize>,
    pub max_connections_per_identity: Option<usize>,
    /// 0: no rate limit.
    pub max_messages_per_second: Option<u32>,
    pub message_burst: Option<u32>,
    pub flood_close_secs: Option<u64>,
    pub breaker_failures: Option<u32>,
    pub breaker_cool_down_secs: Option<u64>,
    pub slow_call_ms: Option<u64>,
    pub slow_lane: Option<usize>,
    pub request_head_timeout_secs: Option<u64>,
    pub keep_previous_secs: Option<u64>,
    pub probation_secs: Option<u64>,
    pub rollback_failure_share: Option<f64>,
    pub rollback_min_calls: Option<u64>,
    pub resume_ttl_secs: Option<u64>,
    pub resume_frames: Option<usize>,
    pub resume_bytes: Option<usize>,
    pub outbox_frames: Option<usize>,
    pub outbox_bytes: Option<usize>,
    pub write_timeout_secs: Option<u64>,
    pub dedupe_ids: Option<usize>,
    pub dedupe_secs: Option<u64>,
    pub presence_grace_ms: Option<u64>,
    pub ping_interval_secs: Option<u64>,
    pub pong_timeout_secs: Option<u64>,
    pub dev_identity: Option<bool>,
    /// At most one of the three key settings may be given (checked by [`Settings::apply`]).
    pub jwt_secret_file: Option<PathBuf>,
    pub jwt_public_key: Option<PathBuf>,
    pub jwt_jwks: Option<PathBuf>,
    pub jwt_audience: Option<String>,
    pub jwt_issuer: Option<String>,
    pub jwt_leeway_secs: Option<u64>,
    pub allow_guests: Option<bool>,
    /// Replaces the list when set.
    pub allowed_origins: Option<Vec<String>>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// The Redis URL of a cluster to join.
    pub cluster: Option<String>,
    pub cluster_node_ttl_secs: Option<u64>,
    pub cluster_stream_length: Option<usize>,
    pub cluster_publish_timeout_secs: Option<u64>,
    /// Who may join which rooms (`[[rooms.rule]]`; no flag: structured rules live in the file).
    pub room_rules: Option<RoomRules>,
}

/// Why settings cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error(
        "give one token key, not several (auth.hs256_secret_file, auth.public_key_file, auth.jwks_file; --jwt-secret-file, --jwt-public-key, --jwt-jwks)"
    )]
    SeveralKeys,
    #[error(
        "TLS needs both a certificate and a key (tls.cert and tls.key; --tls-cert and --tls-key)"
    )]
    HalfTls,
}

impl Settings {
    /// These settings over `other`'s: each one set here wins.
    pub fn over(self, other: Settings) -> Settings {
        macro_rules! pick {
            ($mine:ident, $theirs:ident; $($field:ident),* $(,)?) => {
                Settings { $($field: $mine.$field.or($theirs.$field),)* }
            };
        }
        // A key given here replaces any key of `other`, whatever its kind.
        let key_here = self.jwt_secret_file.is_some()
            || self.jwt_public_key.is_some()
            || self.jwt_jwks.is_some();
        let other = if key_here {
            Settings {
                jwt_secret_file: None,
                jwt_public_key: None,
                jwt_jwks: None,
                ..other
            }
        } else {
            other
        };
        pick!(
            self, other;
            listen,
            manifests,
            build,
            max_message_bytes,
            max_json_depth,
            max_json_array,
            max_rooms_per_connection,
            max_room_members,
            max_connections,
            max_connections_per_ip,
            max_connections_per_identity,
            max_messages_per_second,
            message_burst,
            flood_close_secs,
            breaker_failures,
            breaker_cool_down_secs,
            slow_call_ms,
            slow_lane,
            request_head_timeout_secs,
            keep_previous_secs,
            probation_secs,
            rollback_failure_share,
            rollback_min_calls,
            resume_ttl_secs,
            resume_frames,
            resume_bytes,
            outbox_frames,
            outbox_bytes,
            write_timeout_secs,
            dedupe_ids,
            dedupe_secs,
            presence_grace_ms,
            ping_interval_secs,
            pong_timeout_secs,
            dev_identity,
            jwt_secret_file,
            jwt_public_key,
            jwt_jwks,
            jwt_audience,
            jwt_issuer,
            jwt_leeway_secs,
            allow_guests,
            allowed_origins,
            tls_cert,
            tls_key,
            cluster,
            cluster_node_ttl_secs,
            cluster_stream_length,
            cluster_publish_timeout_secs,
            room_rules,
        )
    }

    /// Writes every setting given into `config`; the others keep their value.
    pub fn apply(&self, config: &mut Config) -> Result<(), SettingsError> {
        fn set<T: Clone>(target: &mut T, value: &Option<T>) {
            if let Some(v) = value {
                *target = v.clone();
            }
        }
        let secs = |v: &Option<u64>| v.map(Duration::from_secs);
        let secs_min1 = |v: &Option<u64>| v.map(|s| Duration::from_secs(s.max(1)));
        set(&mut config.listen, &self.listen);
        set(&mut config.manifests, &self.manifests);
        set(&mut config.build, &self.build);
        set(
            &mut config.limits.max_message_bytes,
            &self.max_message_bytes,
        );
        let limits = &mut config.limits;
        set(
            &mut limits.json.max_depth,
            &self
                .max_json_depth
                .map(|d| d.clamp(1, crate::protocol::MAX_JSON_DEPTH_CEILING)),
        );
        set(
            &mut limits.json.max_array,
            &self.max_json_array.map(|n| n.max(1)),
        );
        set(
            &mut limits.max_rooms_per_connection,
            &self.max_rooms_per_connection,
        );
        set(&mut limits.max_room_members, &self.max_room_members);
        set(&mut limits.connections.total, &self.max_connections);
        set(&mut limits.connections.per_ip, &self.max_connections_per_ip);
        set(
            &mut limits.connections.per_identity,
            &self.max_connections_per_identity,
        );
        // A rate of 0 turns the limit off; the burst and the flood time apply to a limit in
        // force (the default one unless a rate is given).
        match self.max_messages_per_second.map(NonZeroU32::new) {
            Some(None) => limits.rate = None,
            Some(Some(per_second)) => {
                let rate = limits.rate.get_or_insert_with(RateLimit::default);
                rate.per_second = per_second;
            }
            None => {}
        }
        if let Some(rate) = &mut limits.rate {
            if let Some(burst) = self.message_burst {
                rate.burst = NonZeroU32::new(burst).unwrap_or(rate.per_second);
            }
            set(&mut rate.close_after, &secs(&self.flood_close_secs));
        }
        let breaker = &mut limits.breaker;
        set(&mut breaker.failures, &self.breaker_failures);
        set(&mut breaker.cool_down, &secs(&self.breaker_cool_down_secs));
        set(
            &mut breaker.slow_call,
            &self.slow_call_ms.map(|ms| Duration::from_millis(ms.max(1))),
        );
        set(&mut breaker.slow_lane, &self.slow_lane.map(|n| n.max(1)));
        set(
            &mut config.request_head_timeout,
            &secs_min1(&self.request_head_timeout_secs),
        );
        let swap = &mut config.swap;
        set(&mut swap.keep_previous, &secs(&self.keep_previous_secs));
        set(&mut swap.probation, &secs(&self.probation_secs));
        set(
            &mut swap.max_failure_share,
            &self.rollback_failure_share.map(|s| s.clamp(0.0, 1.0)),
        );
        set(&mut swap.min_calls, &self.rollback_min_calls);
        let session = &mut config.session;
        set(&mut session.resume_ttl, &secs(&self.resume_ttl_secs));
        set(&mut session.bounds.kept_frames, &self.resume_frames);
        set(&mut session.bounds.kept_bytes, &self.resume_bytes);
        set(
            &mut session.bounds.live_frames,
            &self.outbox_frames.map(|n| n.max(1)),
        );
        set(
            &mut session.bounds.live_bytes,
            &self.outbox_bytes.map(|n| n.max(1)),
        );
        set(
            &mut session.write_timeout,
            &secs_min1(&self.write_timeout_secs),
        );
        set(&mut session.dedupe_ids, &self.dedupe_ids);
        set(&mut session.dedupe_ttl, &secs(&self.dedupe_secs));
        set(
            &mut session.presence_grace,
            &self.presence_grace_ms.map(Duration::from_millis),
        );
        set(
            &mut session.ping_interval,
            &secs_min1(&self.ping_interval_secs),
        );
        set(
            &mut session.pong_timeout,
            &secs_min1(&self.pong_timeout_secs),
        );
        set(&mut session.dev_identity, &self.dev_identity);
        let keys = [
            self.jwt_secret_file.clone().map(KeySource::Hs256SecretFile),
            self.jwt_public_key.clone().map(KeySource::PublicKeyPem),
            self.jwt_jwks.clone().map(KeySource::Jwks),
        ];
        let mut keys = keys.into_iter().flatten();
        if let Some(key) = keys.next() {
            if keys.next().is_some() {
                return Err(SettingsError::SeveralKeys);
            }
            config.auth.key = Some(key);
        }
        let auth = &mut config.auth;
        if self.jwt_audience.is_some() {
            auth.audience = self.jwt_audience.clone();
        }
        if self.jwt_issuer.is_some() {
            auth.issuer = self.jwt_issuer.clone();
        }
        set(&mut auth.leeway_secs, &self.jwt_leeway_secs);
        set(&mut auth.allow_guests, &self.allow_guests);
        set(&mut auth.allowed_origins, &self.allowed_origins);
        set(&mut auth.room_rules, &self.room_rules);
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                config.tls = Some(TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                });
            }
            (None, None) => {}
            _ => return Err(SettingsError::HalfTls),
        }
        if let Some(url) = &self.cluster {
            let cluster = config
                .cluster
                .get_or_insert_with(|| crate::cluster::ClusterConfig::new(url.clone()));
            cluster.redis_url = url.clone();
        }
        if let Some(cluster) = &mut config.cluster {
            // The lease is at most 15 s: a dead node's members must leave within that bound.
            set(
                &mut cluster.node_ttl,
                &self
                    .cluster_node_ttl_secs
                    .map(|s| Duration::from_secs(s.clamp(1, 15))),
            );
            set(
                &mut cluster.stream_length,
                &self.cluster_stream_length.map(|n| n.max(1)),
            );
            set(
                &mut cluster.publish_timeout,
                &secs_min1(&self.cluster_publish_timeout_secs),
            );
        }
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    listen: Option<Spanned<String>>,
    manifests: Option<PathBuf>,
    build: Option<bool>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    session: RawSession,
    #[serde(default)]
    swap: RawSwap,
    #[serde(default)]
    breaker: RawBreaker,
    #[serde(default)]
    auth: RawAuth,
    tls: Option<Spanned<RawTls>>,
    #[serde(default)]
    cluster: RawCluster,
    rooms: Option<RawRooms>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    redis: Option<String>,
    node_ttl_secs: Option<u64>,
    stream_length: Option<usize>,
    publish_timeout_secs: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRooms {
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    pattern: Spanned<String>,
    #[serde(default)]
    require: BTreeMap<String, Spanned<toml::Value>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_message_bytes: Option<usize>,
    max_json_depth: Option<usize>,
    max_json_array: Option<usize>,
    max_rooms_per_connection: Option<usize>,
    max_room_members: Option<usize>,
    max_connections: Option<usize>,
    max_connections_per_ip: Option<usize>,
    max_connections_per_identity: Option<usize>,
    max_messages_per_second: Option<u32>,
    message_burst: Option<u32>,
    flood_close_secs: Option<u64>,
    request_head_timeout_secs: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBreaker {
    failures: Option<u32>,
    cool_down_secs: Option<u64>,
    slow_call_ms: Option<u64>,
    slow_lane: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSession {
    resume_ttl_secs: Option<u64>,
    resume_frames: Option<usize>,
    resume_bytes: Option<usize>,
    outbox_frames: Option<usize>,
    outbox_bytes: Option<usize>,
    write_timeout_secs: Option<u64>,
    dedupe_ids: Option<usize>,
    dedupe_secs: Option<u64>,
    presence_grace_ms: Option<u64>,
    ping_interval_secs: Option<u64>,
    pong_timeout_secs: Option<u64>,
    dev_identity: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSwap {
    keep_previous_secs: Option<u64>,
    probation_secs: Option<u64>,
    rollback_failure_share: Option<Spanned<f64>>,
    rollback_min_calls: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    hs256_secret_file: Option<Spanned<PathBuf>>,
    public_key_file: Option<Spanned<PathBuf>>,
    jwks_file: Option<Spanned<PathBuf>>,
    audience: Option<String>,
    issuer: Option<String>,
    leeway_secs: Option<u64>,
    allow_guests: Option<bool>,
    allowed_origins: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|b| *b == b'\n')
        .count()
        + 1
}

/// Reads and checks `path`. Relative paths in it are relative to the file's directory.
pub fn load(path: &Path) -> Result<Settings, ConfigFileError> {
    let err = |line: Option<usize>, message: String| ConfigFileError {
        file: path.to_owned(),
        line,
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(None, format!("cannot read: {e}")))?;
    parse(&text, path.parent().unwrap_or(Path::new(".")))
        .map_err(|(line, message)| err(line, message))
}

/// Parses a file's text; relative paths are joined to `base`. The error: line and message.
pub fn parse(text: &str, base: &Path) -> Result<Settings, (Option<usize>, String)> {
    let raw: Raw = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start));
        (line, e.message().trim_end().to_owned())
    })?;
    let line = |span: std::ops::Range<usize>| Some(line_of(text, span.start));
    let path = |p: Option<PathBuf>| p.map(|p| base.join(p));
    let listen = match raw.listen {
        None => None,
        Some(spanned) => Some(spanned.get_ref().parse::<SocketAddr>().map_err(|e| {
            (
                line(spanned.span()),
                format!("`listen` must be an address such as 127.0.0.1:8080: {e}"),
            )
        })?),
    };
    let share = match raw.swap.rollback_failure_share {
        None => None,
        Some(spanned) => {
            let share = *spanned.get_ref();
            if !(0.0..=1.0).contains(&share) {
                return Err((
                    line(spanned.span()),
                    "`rollback_failure_share` must be between 0 and 1".into(),
                ));
            }
            Some(share)
        }
    };
    let keys = [
        &raw.auth.hs256_secret_file,
        &raw.auth.public_key_file,
        &raw.auth.jwks_file,
    ];
    if keys.iter().filter(|k| k.is_some()).count() > 1 {
        // The line of the key given last: the one too many.
        let last = keys.into_iter().flatten().map(|k| k.span().start).max();
        return Err((
            last.map(|start| line_of(text, start)),
            SettingsError::SeveralKeys.to_string(),
        ));
    }
    let room_rules = match raw.rooms {
        None => None,
        Some(rooms) => Some(room_rules(text, rooms)?),
    };
    let (tls_cert, tls_key) = match raw.tls {
        Some(tls) => {
            let tls = tls.into_inner();
            (Some(base.join(tls.cert)), Some(base.join(tls.key)))
        }
        None => (None, None),
    };
    Ok(Settings {
        listen,
        manifests: path(raw.manifests),
        build: raw.build,
        max_message_bytes: raw.limits.max_message_bytes,
        max_json_depth: raw.limits.max_json_depth,
        max_json_array: raw.limits.max_json_array,
        max_rooms_per_connection: raw.limits.max_rooms_per_connection,
        max_room_members: raw.limits.max_room_members,
        max_connections: raw.limits.max_connections,
        max_connections_per_ip: raw.limits.max_connections_per_ip,
        max_connections_per_identity: raw.limits.max_connections_per_identity,
        max_messages_per_second: raw.limits.max_messages_per_second,
        message_burst: raw.limits.message_burst,
        flood_close_secs: raw.limits.flood_close_secs,
        breaker_failures: raw.breaker.failures,
        breaker_cool_down_secs: raw.breaker.cool_down_secs,
        slow_call_ms: raw.breaker.slow_call_ms,
        slow_lane: raw.breaker.slow_lane,
        request_head_timeout_secs: raw.limits.request_head_timeout_secs,
        keep_previous_secs: raw.swap.keep_previous_secs,
        probation_secs: raw.swap.probation_secs,
        rollback_failure_share: share,
        rollback_min_calls: raw.swap.rollback_min_calls,
        resume_ttl_secs: raw.session.resume_ttl_secs,
        resume_frames: raw.session.resume_frames,
        resume_bytes: raw.session.resume_bytes,
        outbox_frames: raw.session.outbox_frames,
        outbox_bytes: raw.session.outbox_bytes,
        write_timeout_secs: raw.session.write_timeout_secs,
        dedupe_ids: raw.session.dedupe_ids,
        dedupe_secs: raw.session.dedupe_secs,
        presence_grace_ms: raw.session.presence_grace_ms,
        ping_interval_secs: raw.session.ping_interval_secs,
        pong_timeout_secs: raw.session.pong_timeout_secs,
        dev_identity: raw.session.dev_identity,
        jwt_secret_file: path(raw.auth.hs256_secret_file.map(Spanned::into_inner)),
        jwt_public_key: path(raw.auth.public_key_file.map(Spanned::into_inner)),
        jwt_jwks: path(raw.auth.jwks_file.map(Spanned::into_inner)),
        jwt_audience: raw.auth.audience,
        jwt_issuer: raw.auth.issuer,
        jwt_leeway_secs: raw.auth.leeway_secs,
        allow_guests: raw.auth.allow_guests,
        allowed_origins: raw.auth.allowed_origins,
        tls_cert,
        tls_key,
        cluster: raw.cluster.redis,
        cluster_node_ttl_secs: raw.cluster.node_ttl_secs,
        cluster_stream_length: raw.cluster.stream_length,
        cluster_publish_timeout_secs: raw.cluster.publish_timeout_secs,
        room_rules,
    })
}

/// The `[[rooms.rule]]` tables, checked: a bad pattern or value names its line.
fn room_rules(text: &str, rooms: RawRooms) -> Result<RoomRules, (Option<usize>, String)> {
    let mut rules: Vec<(RoomRule, usize)> = Vec::new();
    for (i, spanned) in rooms.rule.into_iter().enumerate() {
        let raw = spanned.into_inner();
        let pattern_line = line_of(text, raw.pattern.span().start);
        let pattern = raw.pattern.into_inner();
        let mut require = Vec::new();
        for (claim, value) in raw.require {
            let line = line_of(text, value.span().start);
            let value = match value.into_inner() {
                toml::Value::String(s) => ClaimValue::Text(s),
                toml::Value::Integer(n) => ClaimValue::Integer(n),
                toml::Value::Boolean(b) => ClaimValue::Bool(b),
                other => {
                    return Err((
                        Some(line),
                        format!(
                            "room rule {} (`{pattern}`): the value of claim `{claim}` must be a string, an integer or a boolean, not {}",
                            i + 1,
                            other.type_str()
                        ),
                    ));
                }
            };
            require.push((claim, value));
        }
        let rule = RoomRule::new(&pattern, require)
            .map_err(|e| (Some(pattern_line), format!("room rule {}: {e}", i + 1)))?;
        if let Some((_, first)) = rules.iter().find(|(r, _)| r.pattern() == pattern) {
            return Err((
                Some(pattern_line),
                format!(
                    "room rule {}: pattern `{pattern}` is already the pattern of the rule on line {first}, which decides first: this rule would never apply",
                    i + 1
                ),
            ));
        }
        rules.push((rule, pattern_line));
    }
    Ok(RoomRules::new(rules.into_iter().map(|(r, _)| r).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_name_their_line() {
        let text = "listen = \"127.0.0.1:9000\"\n\n[session]\nresume_ttl_secs = 5\nresume_tl = 3\n";
        let (line, message) = parse(text, Path::new("/etc")).unwrap_err();
        assert_eq!(line, Some(5), "{message}");
        assert!(message.contains("resume_tl"), "{message}");
    }

    #[test]
    fn values_are_read_and_paths_are_relative_to_the_file() {
        let text = "manifests = \"m\"\n[auth]\njwks_file = \"keys.json\"\nallowed_origins = [\"https://a.example\"]\n[tls]\ncert = \"c.pem\"\nkey = \"/k.pem\"\n";
        let s = parse(text, Path::new("/etc/plexus")).unwrap();
        assert_eq!(s.manifests.as_deref(), Some(Path::new("/etc/plexus/m")));
        assert_eq!(
            s.jwt_jwks.as_deref(),
            Some(Path::new("/etc/plexus/keys.json"))
        );
        assert_eq!(s.tls_key.as_deref(), Some(Path::new("/k.pem")));
        let mut config = Config::new("x");
        s.apply(&mut config).unwrap();
        assert!(matches!(config.auth.key, Some(KeySource::Jwks(_))));
        assert_eq!(config.auth.allowed_origins, ["https://a.example"]);
        assert!(config.tls.is_some());
    }

    #[test]
    fn flags_win_over_the_file() {
        let file = parse(
            "[limits]\nmax_message_bytes = 10\n[auth]\njwks_file = \"k.json\"\n",
            Path::new("/"),
        )
        .unwrap();
        let flags = Settings {
            max_message_bytes: Some(99),
            jwt_secret_file: Some("s".into()),
            ..Settings::default()
        };
        let mut config = Config::new("x");
        flags.over(file).apply(&mut config).unwrap();
        assert_eq!(config.limits.max_message_bytes, 99);
        assert!(matches!(
            config.auth.key,
            Some(KeySource::Hs256SecretFile(_))
        ));
    }

    #[test]
    fn room_rules_are_read_in_order_and_checked() {
        let text = r#"
[[rooms.rule]]
pattern = "admin:*"
require = { role = "admin", level = 3, staff = true }

[[rooms.rule]]
pattern = "user:{sub}"
"#;
        let s = parse(text, Path::new("/")).unwrap();
        let rules = s.room_rules.clone().expect("rules");
        assert_eq!(rules.len(), 2);
        let claims = |v: serde_json::Value| v.as_object().cloned().unwrap();
        let admin = claims(serde_json::json!({"role": "admin", "level": 3, "staff": true}));
        assert!(rules.check("admin:x", Some(&admin)).is_ok());
        let err = rules.check("user:bob", Some(&admin)).unwrap_err();
        assert_eq!(err.number, 2);
        let mut config = Config::new("x");
        s.apply(&mut config).unwrap();
        assert_eq!(config.auth.room_rules, rules);

        let bad = |text: &str| parse(text, Path::new("/")).unwrap_err();
        let (line, message) = bad("\n[[rooms.rule]]\npattern = \"user:{sub\"\n");
        assert_eq!(line, Some(3), "{message}");
        assert!(
            message.contains("room rule 1") && message.contains("user:{sub"),
            "{message}"
        );
        let (line, message) =
            bad("[[rooms.rule]]\npattern = \"a:*\"\nrequire = { role = [\"x\"] }\n");
        assert_eq!(line, Some(3), "{message}");
        assert!(message.contains("claim `role`"), "{message}");
        let (line, message) = bad("[[rooms.rule]]\npattern = \"a\"\nrole = \"x\"\n");
        assert_eq!(line, Some(3), "{message}");
        assert!(message.contains("unknown field `role`"), "{message}");
        let (line, message) =
            bad("[[rooms.rule]]\npattern = \"a:*\"\n[[rooms.rule]]\npattern = \"a:*\"\n");
        assert_eq!(line, Some(4), "{message}");
        assert!(message.contains("line 2"), "{message}");
        let (_, message) = bad("[rooms]\nrules = []\n");
        assert!(message.contains("unknown field `rules`"), "{message}");
    }

    #[test]
    fn durations_too_long_for_the_clock_are_accepted_and_can_be_armed() {
        // The largest integer TOML has, for every duration in seconds: the deadlines the host
        // set with them overflowed the clock (a property of the `config_parse` fuzz target).
        let max = i64::MAX;
        let text = format!(
            "[limits]\nflood_close_secs = {max}\nrequest_head_timeout_secs = {max}\n\
             [session]\nresume_ttl_secs = {max}\nwrite_timeout_secs = {max}\ndedupe_secs = {max}\n\
             ping_interval_secs = {max}\npong_timeout_secs = {max}\n\
             [swap]\nkeep_previous_secs = {max}\nprobation_secs = {max}\n\
             [breaker]\nfailures = 1\ncool_down_secs = {max}\n\
             [auth]\nleeway_secs = {max}\n"
        );
        let mut config = Config::new("x");
        parse(&text, Path::new("/"))
            .unwrap()
            .apply(&mut config)
            .unwrap();
        let health = crate::registry::Health::default();
        health.start_probation(&config.swap);
        assert!(health.on_probation());
        health.record_circuit(true, &config.limits.breaker);
        assert!(health.admit().is_err());
        let exp = crate::protocol::now_ms() / 1000 + 3600;
        crate::auth::deadline(exp.saturating_add(config.auth.leeway_secs));
        let session = &config.session;
        for d in [
            session.ping_interval,
            session.pong_timeout,
            config.swap.keep_previous,
            config.request_head_timeout,
        ] {
            let _ = std::time::Instant::now() + crate::timers::capped(d);
        }
    }

    #[test]
    fn bad_values_name_their_line() {
        let (line, _) = parse("\n\nlisten = \"nowhere\"\n", Path::new("/")).unwrap_err();
        assert_eq!(line, Some(3));
        // Two token keys: the second one's line (a property of the `config_parse` fuzz target:
        // this error had none).
        let (line, message) = parse(
            "[auth]\njwks_file = \"k.json\"\naudience = \"a\"\nhs256_secret_file = \"s\"\n",
            Path::new("/"),
        )
        .unwrap_err();
        assert_eq!(line, Some(4), "{message}");
        assert!(message.contains("one token key"), "{message}");
        let (line, message) =
            parse("[swap]\nprobation_secs = \"x\"\n", Path::new("/")).unwrap_err();
        assert_eq!(line, Some(2), "{message}");
    }
}
