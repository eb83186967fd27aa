//! `plexus.toml` through the real binary: unknown keys, wrong types and unreadable room rules
//! are errors naming the file and line, the file in the working directory is read, flags
//! override the file's values, and contradicting settings refuse to start.

mod support;

use std::path::Path;
use std::process::Stdio;

use support::{TempDir, echo_manifest, within};
use tokio::io::{AsyncReadExt, BufReader};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Runs `plexus serve ARGS` in `dir` until it exits; it must fail. Returns its stderr.
async fn serve_fails(dir: &Path, args: &[&str]) -> String {
    let out = within(
        "plexus serve to exit",
        tokio::process::Command::new(support::plexus_bin())
            .arg("serve")
            .args(args)
            .current_dir(dir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("running plexus");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "plexus started; stderr:\n{stderr}");
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_keys_and_wrong_types_name_the_file_and_line() {
    let dir = TempDir::new();
    dir.write(
        "host.toml",
        "listen = \"127.0.0.1:0\"\n\n[session]\nresume_ttl_secs = 30\nresume_tll_secs = 5\n",
    );
    let stderr = serve_fails(dir.path(), &["--config", "host.toml"]).await;
    assert!(stderr.contains("host.toml:5:"), "{stderr}");
    assert!(stderr.contains("resume_tll_secs"), "{stderr}");

    dir.write("types.toml", "[auth]\nallow_guests = \"yes\"\n");
    let stderr = serve_fails(dir.path(), &["--config", "types.toml"]).await;
    assert!(stderr.contains("types.toml:2:"), "{stderr}");

    // plexus.toml in the working directory is read without --config.
    dir.write(
        "plexus.toml",
        "\n[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\nca = \"x\"\n",
    );
    let stderr = serve_fails(dir.path(), &[]).await;
    assert!(stderr.contains("plexus.toml:5:"), "{stderr}");
    assert!(stderr.contains("`ca`"), "{stderr}");

    // A room rule's pattern that cannot be read.
    dir.write(
        "rules.toml",
        "[[rooms.rule]]\npattern = \"admin:*\"\nrequire = { role = \"admin\" }\n\n[[rooms.rule]]\npattern = \"user:{sub\"\n",
    );
    let stderr = serve_fails(dir.path(), &["--config", "rules.toml"]).await;
    assert!(stderr.contains("rules.toml:6: room rule 2:"), "{stderr}");
    assert!(stderr.contains("`user:{sub`"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contradicting_settings_refuse_to_start() {
    let dir = TempDir::new();
    dir.write("secret", "s3cret\n");
    let stderr = serve_fails(
        dir.path(),
        &[
            "--jwt-secret-file",
            "secret",
            "--dev-insecure-identity",
            "--no-build",
        ],
    )
    .await;
    assert!(stderr.contains("--dev-insecure-identity"), "{stderr}");
    assert!(stderr.contains("--jwt-secret-file"), "{stderr}");

    dir.write(
        "keys.toml",
        "[auth]\nhs256_secret_file = \"secret\"\n[session]\ndev_identity = true\n",
    );
    let stderr = serve_fails(dir.path(), &["--config", "keys.toml", "--no-build"]).await;
    assert!(stderr.contains("session.dev_identity"), "{stderr}");
    assert!(stderr.contains("auth.hs256_secret_file"), "{stderr}");

    let stderr = serve_fails(dir.path(), &["--tls-cert", "c.pem", "--no-build"]).await;
    assert!(stderr.contains("--tls-key"), "{stderr}");
}

/// A child process killed when dropped (only this child, by its handle).
struct ChildGuard(tokio::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flags_override_the_file_and_the_file_fills_in_the_rest() {
    let dir = TempDir::new();
    std::fs::create_dir(dir.path().join("m")).unwrap();
    std::fs::write(dir.path().join("m/echo.toml"), echo_manifest()).unwrap();
    // The file's address cannot be bound here (a documentation network): the host starts only
    // if the flag replaces it. Its manifests directory (relative to the file) and origins apply.
    dir.write(
        "plexus.toml",
        r#"listen = "192.0.2.1:9"
manifests = "m"
build = false

[auth]
allowed_origins = ["https://file.example"]
"#,
    );
    let child = tokio::process::Command::new(support::plexus_bin())
        .args(["serve", "--config"])
        .arg(dir.path().join("plexus.toml"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--allowed-origin",
            "https://flag.example",
        ])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawning plexus serve");
    let mut guard = ChildGuard(child);
    let mut stderr = guard.0.stderr.take().expect("piped stderr");
    let stderr_text = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });
    let mut stdout = BufReader::new(guard.0.stdout.take().expect("piped stdout"));
    let addr = support::listening_addr(&mut stdout).await;
    let Ok(addr) = addr else {
        let line = addr.unwrap_err();
        let _ = guard.0.start_kill();
        let stderr = within("stderr", stderr_text).await.unwrap_or_default();
        panic!("unexpected first line {line:?}; stderr:\n{stderr}");
    };

    let connect = |origin: &'static str| async move {
        let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
        req.headers_mut().insert("Origin", origin.parse().unwrap());
        within("the handshake", tokio_tungstenite::connect_async(req)).await
    };
    // The flag's list replaced the file's.
    assert!(connect("https://flag.example").await.is_ok());
    match connect("https://file.example").await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 403)
        }
        other => panic!("expected a 403, got {other:?}"),
    }
    // The manifests directory came from the file.
    let mut c = support::Client::connect(addr).await;
    c.echo_round_trip().await;
}

#[test]
fn the_documented_example_sets_every_setting() {
    let doc = std::fs::read_to_string(support::repo_root().join("docs/operations.md"))
        .expect("docs/operations.md");
    let section = doc
        .split_once("## plexus.toml")
        .expect("the plexus.toml section")
        .1;
    let example = section
        .split_once("```toml\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .expect("a toml example")
        .0;
    let settings = plexus::config_file::parse(example, Path::new("/etc/plexus"))
        .unwrap_or_else(|(line, e)| panic!("the example fails at line {line:?}: {e}"));
    // Every setting but the two key files the example leaves out (one key at a time).
    let text = format!("{settings:?}");
    let unset: Vec<&str> = text
        .split(", ")
        .filter(|field| field.ends_with(": None"))
        .collect();
    assert_eq!(
        unset,
        ["jwt_secret_file: None", "jwt_public_key: None"],
        "{text}"
    );
}
