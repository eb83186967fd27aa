//! Golden tests of `plexus check`: each directory of `tests/ui/` is a manifests directory plus
//! the `expected.stderr` the check must print for it. The case directory's absolute path is
//! written `$DIR` and the repository root `$ROOT`. Cases named `ok*` must pass (exit 0); every
//! other case must fail (exit 1).
//!
//! `BLESS=1 cargo test -p plexus --test manifests` rewrites the expected files.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The cases that must exist (others may be added freely).
const REQUIRED: &[&str] = &[
    "unknown-field",
    "duplicate-route",
    "missing-plugin",
    "capability-not-granted",
    "bad-version",
    "reserved-type",
    "unknown-handler",
    "ok",
];

fn ui_dir() -> PathBuf {
    support::repo_root().join("tests/ui")
}

fn cases() -> Vec<PathBuf> {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(ui_dir())
        .expect("reading tests/ui")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    cases
}

fn normalize(text: &str, case: &Path) -> String {
    text.replace(&case.display().to_string(), "$DIR")
        .replace(&support::repo_root().display().to_string(), "$ROOT")
}

struct Outcome {
    name: String,
    problems: Vec<String>,
}

fn run_case(case: &Path, bless: bool) -> Outcome {
    let name = case.file_name().unwrap().to_string_lossy().into_owned();
    let mut problems = Vec::new();
    let output = Command::new(support::plexus_bin())
        .args(["check", "--no-build", "--manifests"])
        .arg(case)
        .env("RUST_LOG", "off")
        .output()
        .expect("running plexus check");
    let stderr = normalize(&String::from_utf8_lossy(&output.stderr), case);
    let stdout = String::from_utf8_lossy(&output.stdout);

    let expect_ok = name.starts_with("ok");
    let code = output.status.code();
    if expect_ok && code != Some(0) {
        problems.push(format!("expected exit code 0, got {:?}", output.status));
    }
    if !expect_ok && code != Some(1) {
        problems.push(format!("expected exit code 1, got {:?}", output.status));
    }
    if expect_ok && !stdout.lines().any(|l| l.starts_with("ok: plugin `")) {
        problems.push(format!(
            "expected `ok: plugin ...` on stdout, got {stdout:?}"
        ));
    }

    let expected_file = case.join("expected.stderr");
    if bless {
        std::fs::write(&expected_file, &stderr).expect("writing expected.stderr");
    } else {
        match std::fs::read_to_string(&expected_file) {
            Ok(expected) if expected == stderr => {}
            Ok(expected) => problems.push(format!(
                "stderr differs from expected.stderr\n--- expected\n{expected}--- actual\n{stderr}---"
            )),
            Err(e) => problems.push(format!(
                "cannot read {} ({e}); run with BLESS=1 to create it. Actual stderr:\n{stderr}",
                expected_file.display()
            )),
        }
    }
    Outcome { name, problems }
}

#[test]
fn check_reports_match_the_golden_files() {
    // The capability case points at the real echo component.
    support::plugins_dir();
    let bless = std::env::var_os("BLESS").is_some_and(|v| v != "0" && !v.is_empty());
    let cases = cases();
    for required in REQUIRED {
        assert!(
            cases.iter().any(|c| c.ends_with(required)),
            "missing case tests/ui/{required}"
        );
    }
    let failures: Vec<String> = cases
        .iter()
        .map(|case| run_case(case, bless))
        .filter(|o| !o.problems.is_empty())
        .map(|o| format!("case `{}`:\n  {}", o.name, o.problems.join("\n  ")))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn every_case_has_a_manifest() {
    for case in cases() {
        let manifests = std::fs::read_dir(&case)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "toml")
            })
            .count();
        assert!(manifests > 0, "{} has no manifest", case.display());
    }
}
