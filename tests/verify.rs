//! `meridian verify` on a sealed session folder: passes untouched, and after each kind of
//! tampering fails naming the fault (the command, run as a user runs it).

use std::path::{Path, PathBuf};
use std::process::Command;

use meridian::compliance::audit::AuditLog;
use meridian::compliance::seal::{seal, SealStatus, SigningKey, MANIFEST, SIGNATURE};
use serde_json::json;

/// A sealed folder with two media files, a snapshot and a six-entry audit log; the node's
/// public key file beside it.
fn sealed_session(root: &Path) -> (PathBuf, PathBuf) {
    let key_path = root.join("node.key");
    let key = SigningKey::load_or_create(&key_path).unwrap();
    let dir = root.join("kyc-42");
    std::fs::create_dir_all(dir.join("snapshots")).unwrap();
    std::fs::write(dir.join("user.webm"), vec![7u8; 4096]).unwrap();
    std::fs::write(dir.join("agent.webm"), vec![9u8; 2048]).unwrap();
    std::fs::write(dir.join("snapshots/document.png"), b"\x89PNG...").unwrap();
    let mut log = AuditLog::create(&dir.join("audit.jsonl")).unwrap();
    for (event, user) in [
        ("session_created", "-"),
        ("participant_joined", "user-1"),
        ("participant_joined", "agent-7"),
        ("checklist_marked", "agent-7"),
        ("participant_left", "user-1"),
        ("session_ended", "-"),
    ] {
        let fields = json!({ "user": user }).as_object().cloned().unwrap();
        log.append(event, fields).unwrap();
    }
    seal(
        &dir,
        "kyc-42",
        SealStatus::Complete,
        &log,
        json!({"participants": [{"user": "user-1", "role": "user"}]}),
        &key,
    )
    .unwrap();
    (dir, root.join("node.pub.pem"))
}

/// Runs `meridian verify`; its exit code and output.
fn verify(dir: &Path, public_key: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .arg("verify")
        .arg(dir)
        .arg("--public-key")
        .arg(public_key)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// A fresh sealed copy, tampered with by `f`: verify must exit 1 and say `expected`.
fn fails_naming(name: &str, expected: &str, f: impl FnOnce(&Path)) {
    let root = tempfile::tempdir().unwrap();
    let (dir, public) = sealed_session(root.path());
    let (code, text) = verify(&dir, &public);
    assert_eq!(code, 0, "untouched copy verifies: {text}");
    f(&dir);
    let (code, text) = verify(&dir, &public);
    assert_eq!(code, 1, "{name}: {text}");
    assert!(
        text.contains(expected),
        "{name}: expected {expected:?} in:\n{text}"
    );
}

fn audit_lines(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("audit.jsonl"))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_audit(dir: &Path, lines: &[String]) {
    std::fs::write(dir.join("audit.jsonl"), lines.join("\n") + "\n").unwrap();
}

#[test]
fn an_untouched_session_verifies_against_the_nodes_key() {
    let root = tempfile::tempdir().unwrap();
    let (dir, public) = sealed_session(root.path());
    let (code, text) = verify(&dir, &public);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("session kyc-42 (Complete), 4 files, 6 audit entries"),
        "{text}"
    );
    assert!(text.contains("(the trusted key)"), "{text}");
}

#[test]
fn one_changed_byte_of_a_media_file_is_named() {
    fails_naming("byte changed", "user.webm changed since sealing", |dir| {
        let mut bytes = std::fs::read(dir.join("user.webm")).unwrap();
        bytes[1000] ^= 1;
        std::fs::write(dir.join("user.webm"), bytes).unwrap();
    });
}

#[test]
fn a_removed_file_is_named() {
    fails_naming(
        "file removed",
        "agent.webm is listed in the manifest but missing",
        |dir| std::fs::remove_file(dir.join("agent.webm")).unwrap(),
    );
}

#[test]
fn an_added_file_is_named() {
    fails_naming(
        "file added",
        "snapshots/extra.png was added after sealing",
        |dir| std::fs::write(dir.join("snapshots/extra.png"), b"x").unwrap(),
    );
}

#[test]
fn a_removed_audit_entry_is_named() {
    fails_naming(
        "entry removed",
        "entry 3 is missing: line 3 holds entry 4",
        |dir| {
            let mut lines = audit_lines(dir);
            lines.remove(2);
            write_audit(dir, &lines);
        },
    );
}

#[test]
fn an_altered_audit_entry_is_named() {
    fails_naming("entry altered", "entry 4 (line 4) was altered", |dir| {
        let mut lines = audit_lines(dir);
        lines[3] = lines[3].replace("agent-7", "agent-8");
        write_audit(dir, &lines);
    });
}

#[test]
fn two_swapped_audit_entries_are_named() {
    fails_naming("entries swapped", "entries 2 and 3 are swapped", |dir| {
        let mut lines = audit_lines(dir);
        lines.swap(1, 2);
        write_audit(dir, &lines);
    });
}

#[test]
fn a_manifest_resigned_with_another_key_is_named() {
    fails_naming("re-signed", "not by the trusted key", |dir| {
        let other = tempfile::tempdir().unwrap();
        let key = SigningKey::load_or_create(&other.path().join("mallory.key")).unwrap();
        std::fs::remove_file(dir.join(MANIFEST)).unwrap();
        std::fs::remove_file(dir.join(SIGNATURE)).unwrap();
        let (log, _) = AuditLog::reopen(&dir.join("audit.jsonl")).unwrap();
        seal(dir, "kyc-42", SealStatus::Complete, &log, json!({}), &key).unwrap();
    });
}

#[test]
fn a_manifest_edited_after_signing_is_named() {
    fails_naming(
        "manifest edited",
        "the manifest does not match its signature",
        |dir| {
            let text = std::fs::read_to_string(dir.join(MANIFEST)).unwrap();
            std::fs::write(
                dir.join(MANIFEST),
                text.replace("\"complete\"", "\"interrupted\""),
            )
            .unwrap();
        },
    );
}

#[test]
fn an_unreadable_public_key_is_a_usage_error() {
    let root = tempfile::tempdir().unwrap();
    let (dir, _) = sealed_session(root.path());
    let (code, text) = verify(&dir, Path::new("/nonexistent/key.pem"));
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("neither 64 hex digits nor a readable key file"),
        "{text}"
    );
}
