//! The configuration parser (`config_file::parse`, what `plexus serve` runs on `plexus.toml`),
//! and the settings it yields applied over the defaults. Properties:
//!
//! - it never panics;
//! - a refusal says something and names a line of the text; text that is not TOML is refused
//!   on the line the TOML parser names when the document does not parse;
//! - accepted text is valid TOML, its paths are joined to the file's directory, its
//!   `rollback_failure_share` is between 0 and 1, and it gives at most one token key and
//!   either both TLS files or none;
//! - accepted settings always apply (what the file checked is all `apply` refuses), within
//!   the bounds `apply` keeps (JSON depth 1 to 128, arrays and queues at least 1), and
//!   `Settings::over` with nothing on either side changes nothing;
//! - the deadlines the applied settings configure can be armed without overflowing the clock.

#![no_main]

use std::path::Path;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use plexus::config_file::{self, Settings};
use plexus::protocol::MAX_JSON_DEPTH_CEILING;
use plexus::registry::{BreakerPolicy, Health};
use plexus::timers::capped;
use serde::de::IgnoredAny;

fuzz_target!(|data: &[u8]| {
    // The file is read with `read_to_string`: text that is not UTF-8 never reaches the parser.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let base = Path::new("/etc/plexus");
    let lines = text.split('\n').count();
    // Syntax errors come from parsing the document; a scalar TOML cannot read (an integer out
    // of range, a malformed date) only when its value is read, so a parser reading keys in
    // another order may name another problem of the text first. Read as the toml crate reads
    // it for a typed structure: an integer past `i64` (TOML's range) still fits a `u64` field.
    let syntax_error = toml::de::DeTable::parse(text).err();
    let toml_error = toml::from_str::<IgnoredAny>(text).err();
    match config_file::parse(text, base) {
        Err((line, message)) => {
            assert!(!message.is_empty());
            // docs/operations.md: a refusal stops the start "with the file and the line".
            let line = line.unwrap_or_else(|| panic!("no line: {message}"));
            assert!((1..=lines).contains(&line), "line {line}: {message}");
            let line = Some(line);
            if let Some(syntax_error) = syntax_error {
                let expected = syntax_error.span().map(|s| line_of(text, s.start));
                assert_eq!(line, expected, "{message} for {syntax_error}");
            }
        }
        Ok(settings) => {
            assert!(
                toml_error.is_none(),
                "accepted text that is not TOML: {toml_error:?}"
            );
            for path in [
                &settings.manifests,
                &settings.jwt_secret_file,
                &settings.jwt_public_key,
                &settings.jwt_jwks,
                &settings.tls_cert,
                &settings.tls_key,
            ]
            .into_iter()
            .flatten()
            {
                assert!(path.is_absolute(), "{path:?} not joined to {base:?}");
            }
            if let Some(share) = settings.rollback_failure_share {
                assert!((0.0..=1.0).contains(&share), "{share}");
            }
            let keys = [
                &settings.jwt_secret_file,
                &settings.jwt_public_key,
                &settings.jwt_jwks,
            ];
            assert!(keys.iter().filter(|k| k.is_some()).count() <= 1);
            assert_eq!(settings.tls_cert.is_some(), settings.tls_key.is_some());

            assert_eq!(settings.clone().over(Settings::default()), settings);
            assert_eq!(Settings::default().over(settings.clone()), settings);

            let mut config = plexus::Config::new("manifests");
            settings
                .apply(&mut config)
                .expect("settings the file accepted apply");
            let limits = &config.limits;
            assert!((1..=MAX_JSON_DEPTH_CEILING).contains(&limits.json.max_depth));
            assert!(limits.json.max_array >= 1);
            assert!(limits.breaker.slow_lane >= 1);
            assert!(!limits.breaker.slow_call.is_zero());
            assert!(config.session.bounds.live_frames >= 1);
            assert!(config.session.bounds.live_bytes >= 1);
            assert!(!config.session.write_timeout.is_zero());
            assert!(!config.session.ping_interval.is_zero());
            assert!(!config.session.pong_timeout.is_zero());
            assert!(!config.request_head_timeout.is_zero());
            assert!((0.0..=1.0).contains(&config.swap.max_failure_share));
            if let Some(rate) = &limits.rate {
                assert!(rate.burst.get() >= 1);
            }
            assert_eq!(config.tls.is_some(), settings.tls_cert.is_some());
            if let Some(listen) = settings.listen {
                assert_eq!(config.listen, listen);
            }
            deadlines(&config);
        }
    }
});

/// The deadlines a configuration sets can be armed: the host adds its durations to the
/// present instant (a probation, an open circuit's cool-down, a token's expiry with the
/// leeway, heartbeats, the stay of a previous version).
fn deadlines(config: &plexus::Config) {
    let health = Health::default();
    health.start_probation(&config.swap);
    let trip_at_once = BreakerPolicy {
        failures: 1,
        ..config.limits.breaker
    };
    health.record_circuit(true, &trip_at_once);
    let _ = health.admit();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let exp = now + 3600;
    let _ = plexus::auth::deadline(exp.saturating_add(config.auth.leeway_secs));
    // Armed inside the connection task, the registry and hyper, through the same bound.
    for d in [
        config.session.ping_interval,
        config.session.pong_timeout,
        config.swap.keep_previous,
        config.request_head_timeout,
    ] {
        assert!(Instant::now().checked_add(capped(d)).is_some(), "{d:?}");
    }
}

/// The 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}
