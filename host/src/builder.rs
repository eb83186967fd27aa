//! Building plugin components: deciding whether an artifact is missing or stale against its
//! sources, and running the manifest's build command.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;
use std::time::SystemTime;

use crate::manifest::Build;

/// Whether `wasm` must be (re)built: it is missing, or a watched source is newer.
pub fn is_stale(wasm: &Path, build: &Build) -> bool {
    let Ok(built) = std::fs::metadata(wasm).and_then(|m| m.modified()) else {
        return true;
    };
    build
        .watch
        .iter()
        .any(|p| newest_mtime(p).is_some_and(|t| t > built))
}

fn newest_mtime(path: &Path) -> Option<SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.is_file() {
        return meta.modified().ok();
    }
    let mut newest = None;
    let mut stack: Vec<PathBuf> = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let p = entry.path();
            let name = entry.file_name();
            if name == "target" || name.to_string_lossy().starts_with('.') {
                continue;
            }
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(p);
            } else if let Ok(t) = meta.modified() {
                newest = newest.max(Some(t));
            }
        }
    }
    newest
}

/// Whether a path lies under one of the build's watched sources.
pub fn watches(build: &Build, path: &Path) -> bool {
    build.watch.iter().any(|w| path.starts_with(w))
        && !path.components().any(|c| c.as_os_str() == "target")
}

static WASM_TARGET: Once = Once::new();

/// Runs the build command (blocking). The error carries the tail of the command's output.
pub fn run(build: &Build) -> Result<(), String> {
    if build.command.contains("wasm32-wasip2") {
        // rustup does not add a toolchain file's targets by itself here.
        WASM_TARGET.call_once(|| {
            let _ = Command::new("rustup")
                .args(["target", "add", "wasm32-wasip2"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        });
    }
    tracing::info!(command = %build.command, dir = %build.dir.display(), "building plugin");
    let output = Command::new("sh")
        .arg("-c")
        .arg(&build.command)
        .current_dir(&build.dir)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .output()
        .map_err(|e| {
            format!(
                "cannot run `{}` in {}: {e}",
                build.command,
                build.dir.display()
            )
        })?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let mut tail: Vec<&str> = stderr.lines().rev().take(20).collect();
    tail.reverse();
    let mut message = format!(
        "build command `{}` failed ({})",
        build.command, output.status
    );
    if !tail.is_empty() {
        message.push_str(":\n");
        message.push_str(&tail.join("\n"));
    }
    if stderr.contains("wasm32-wasip2") && stderr.contains("target may not be installed") {
        message.push_str("\nhint: run `rustup target add wasm32-wasip2`");
    }
    Err(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_artifact_is_stale_and_fresh_one_is_not() {
        let dir = std::env::temp_dir().join(format!("plexus-builder-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("src")).unwrap();
        std::fs::write(dir.join("src/lib.rs"), "").unwrap();
        let build = Build {
            command: "true".into(),
            dir: dir.clone(),
            watch: vec![dir.join("src")],
        };
        let wasm = dir.join("out.wasm");
        assert!(is_stale(&wasm, &build));
        std::fs::write(&wasm, b"x").unwrap();
        let later = SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&wasm)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert!(!is_stale(&wasm, &build));
        assert!(watches(&build, &dir.join("src/lib.rs")));
        assert!(!watches(&build, &dir.join("other")));
        assert!(
            run(&Build {
                command: "exit 3".into(),
                ..build
            })
            .unwrap_err()
            .contains("failed")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
