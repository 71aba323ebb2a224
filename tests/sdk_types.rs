//! The SDK's TypeScript declarations (web/sdk/meridian.d.ts) are served beside the ES module
//! and describe it: an integrator's page written against them type-checks under `tsc
//! --strict`, and the mistakes they exist to catch are caught.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn tsc() -> PathBuf {
    let tsc = root().join("target/ts/node_modules/.bin/tsc");
    assert!(
        tsc.exists(),
        "TypeScript is missing: tests/run.sh installs it into target/ts (npm install --prefix target/ts typescript)"
    );
    tsc
}

/// Type-checks `page` next to a copy of the SDK and its declarations; (passed, output).
fn check(page: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    for f in ["meridian.js", "meridian.d.ts"] {
        std::fs::copy(root().join("web/sdk").join(f), dir.path().join(f)).unwrap();
    }
    std::fs::copy(root().join("tests/sdk").join(page), dir.path().join(page)).unwrap();
    let out = Command::new("node")
        .arg(tsc())
        .args([
            "--noEmit",
            "--strict",
            "--target",
            "es2022",
            "--module",
            "es2022",
            "--moduleResolution",
            "bundler",
            "--lib",
            "es2022,dom",
        ])
        .arg(dir.path().join(page))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn an_integrators_page_type_checks_against_the_declarations() {
    let (ok, out) = check("uses_the_sdk.ts");
    assert!(ok, "{out}");
}

#[test]
fn the_declarations_catch_a_wrong_token_outcome_and_event_field() {
    let (ok, out) = check("misuses_the_sdk.ts");
    assert!(!ok, "mistakes went unnoticed");
    for (line, what) in [(4, "token"), (5, "outcome"), (6, "event detail")] {
        assert!(
            out.contains(&format!("misuses_the_sdk.ts({line},")),
            "the {what} mistake on line {line} is reported:\n{out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_declarations_are_served_beside_the_module() {
    let node = common::start_node().await;
    let served = common::http_get(&node, "/sdk/meridian.d.ts").await;
    let file = std::fs::read_to_string(root().join("web/sdk/meridian.d.ts")).unwrap();
    assert_eq!(served, file);
}
