//! The manifest parser (`manifest::parse`, what `manifest::load` runs on a file's text).
//! Properties:
//!
//! - it never panics;
//! - a refusal names the file, says something, and names a line of the text for every problem
//!   but the one about the whole file (no route and no event); text that is not TOML is refused
//!   with one error, on the line the TOML parser names when the document does not parse;
//! - an accepted manifest is valid TOML and keeps every rule of docs/manifest.md: a plugin id of
//!   `a-z`, `0-9` and `-`, at least one route or event, route types non-empty, not `sys.*` and
//!   declared once, handlers non-empty, events declared once, limits in range, and each route's
//!   line is the line of its table.

#![no_main]

use std::collections::HashSet;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use plexus::manifest::{self, MAX_TIMEOUT_MS};
use serde::de::IgnoredAny;

fuzz_target!(|data: &[u8]| {
    // Manifests are read with `read_to_string`: text that is not UTF-8 never reaches the parser.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("manifests/fuzzed.toml");
    let lines: Vec<&str> = text.split('\n').collect();
    // Syntax errors come from parsing the document; a scalar TOML cannot read (an integer out
    // of range, a malformed date) only when its value is read, so a parser reading keys in
    // another order may name another problem of the text first. Read as the toml crate reads
    // it for a typed structure: an integer past `i64` (TOML's range) still fits a `u64` field.
    let syntax_error = toml::de::DeTable::parse(text).err();
    let toml_error = toml::from_str::<IgnoredAny>(text).err();
    match manifest::parse(file, text) {
        Err(errors) => {
            assert!(!errors.is_empty());
            for e in &errors {
                assert_eq!(e.file, file);
                assert!(!e.message.is_empty(), "{e:?}");
                // Every problem has its line but the one about the whole file.
                match e.line {
                    Some(line) => assert!((1..=lines.len()).contains(&line), "{e:?}"),
                    None => assert!(e.message.contains("declares no [[route]]"), "{e:?}"),
                }
                assert!(e.to_string().starts_with("manifests/fuzzed.toml:"));
            }
            if toml_error.is_some() {
                assert_eq!(errors.len(), 1, "{errors:?}");
                assert!(errors[0].line.is_some(), "{errors:?}");
            }
            if let Some(syntax_error) = syntax_error {
                let expected = syntax_error.span().map(|s| line_of(text, s.start));
                assert_eq!(errors[0].line, expected, "{errors:?} for {syntax_error}");
            }
        }
        Ok(m) => {
            assert!(
                toml_error.is_none(),
                "accepted text that is not TOML: {toml_error:?}"
            );
            assert_eq!(m.file, file);
            assert!(!m.id.is_empty());
            assert!(
                m.id.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
                "{:?}",
                m.id
            );
            assert!(!m.routes.is_empty() || !m.events.is_empty());
            let mut types = HashSet::new();
            for r in &m.routes {
                assert!(!r.ty.is_empty());
                assert!(!r.ty.starts_with("sys."), "{r:?}");
                assert!(types.insert(r.ty.as_str()), "{r:?} twice");
                assert!(!r.handler.is_empty(), "{r:?}");
                assert!((1..=lines.len()).contains(&r.line), "{r:?}");
                // A route is a `[[route]]` table or an inline table in a `route` array.
                let at = lines[r.line - 1];
                assert!(at.contains('[') || at.contains('{'), "{r:?} on {at:?}");
            }
            let mut events = HashSet::new();
            for e in &m.events {
                assert!(events.insert(e.event), "{e:?} twice");
            }
            assert!((1..=MAX_TIMEOUT_MS).contains(&m.limits.timeout_ms));
            assert!((1..=4096).contains(&m.limits.memory_mb));
            // The checks across manifests: one manifest never conflicts with itself.
            assert!(manifest::check_set([&m]).is_empty());
            // Another copy under another id conflicts exactly on its routes.
            let mut other = m.clone();
            other.id.push_str("-b");
            other.file = Path::new("manifests/other.toml").to_path_buf();
            let errors = manifest::check_set([&m, &other]);
            assert_eq!(errors.len(), m.routes.len(), "{errors:?}");
            assert!(errors.iter().all(|e| e.line.is_some()));
        }
    }
});

/// The 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}
