//! The `meridian` command as a newcomer runs it.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn dev_prints_plain_links_after_start_up_and_removes_its_keys_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .arg("dev")
        .env("TMPDIR", tmp.path())
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let logs = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::BufReader::new(stderr).read_to_string(&mut s);
        s
    });
    // Read what the command prints for people until it says how to stop.
    let mut out = Vec::new();
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&out).contains("Press Ctrl-C to stop.") {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "dev did not come up: {}",
            String::from_utf8_lossy(&out)
        );
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0, "dev exited early: {}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&buf[..n]);
    }
    let printed = String::from_utf8(out).unwrap();
    let keys: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(
        keys.len(),
        1,
        "one throwaway certificate directory: {keys:?}"
    );
    assert!(keys[0].join("ca.key").exists());

    // SIGTERM, as systemd or `kill` sends it, not only Ctrl-C.
    // SAFETY: kill only sends a signal to the child we started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    let logs = logs.join().unwrap();
    assert!(status.success(), "{status:?}: {logs}");
    assert!(!keys[0].exists(), "the CA and node keys are removed");

    // Output that is not a terminal carries no colour codes, and the links are not broken
    // up by log lines (those go to stderr).
    assert!(!printed.contains('\u{1b}') && !logs.contains('\u{1b}'));
    assert!(logs.contains("node started"), "{logs}");
    let links: Vec<&str> = printed.lines().filter(|l| l.contains("/demo/")).collect();
    assert_eq!(links.len(), 6, "{printed}");
    assert!(!printed.contains(" INFO "), "{printed}");
}
