//! Session records in a real database, the same tests against SQLite (a file) and against
//! PostgreSQL (Debian's server, a throwaway cluster started here): a recorded session fills
//! the sessions, participants, outcome, recordings and audit index tables, and
//! `meridian sessions list|show` reads them back.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use meridian::auth::Role;
use meridian::compliance::db::SessionDb;
use meridian::node::Node;
use serde_json::{json, Value};

/// A PostgreSQL cluster in a temporary directory, stopped when dropped.
struct Postgres {
    _dir: tempfile::TempDir,
    data: PathBuf,
    bin: PathBuf,
    url: String,
}

fn as_postgres(cmd: &Path) -> Command {
    // The server refuses to run as root: as root, run it as the package's `postgres` user.
    if unsafe { libc::geteuid() } == 0 {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(cmd);
        c
    } else {
        Command::new(cmd)
    }
}

impl Postgres {
    fn start() -> Postgres {
        let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL is installed (tests/run.sh installs Debian's postgresql)")
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|b| b.join("initdb").exists())
            .collect();
        versions.sort();
        let bin = versions.pop().expect("an initdb under /usr/lib/postgresql");
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        if unsafe { libc::geteuid() } == 0 {
            let pg = nix_user("postgres");
            std::os::unix::fs::chown(dir.path(), Some(pg.0), Some(pg.1)).unwrap();
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let out = as_postgres(&bin.join("initdb"))
            .args(["-A", "trust", "-U", "meridian", "-D"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {port} -k {} -c fsync=off",
            dir.path().display()
        );
        let out = as_postgres(&bin.join("pg_ctl"))
            .args(["-w", "-D"])
            .arg(&data)
            .args(["-l"])
            .arg(dir.path().join("server.log"))
            .args(["-o", &opts, "start"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start: {} {}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default()
        );
        Postgres {
            _dir: dir,
            data,
            bin,
            url: format!("postgres://meridian@127.0.0.1:{port}/postgres"),
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin.join("pg_ctl"))
            .args(["-D"])
            .arg(&self.data)
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

/// Uid and gid of a system user, from /etc/passwd.
fn nix_user(name: &str) -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let line = passwd
        .lines()
        .find(|l| l.starts_with(&format!("{name}:")))
        .unwrap_or_else(|| panic!("user {name} exists"));
    let f: Vec<&str> = line.split(':').collect();
    (f[2].parse().unwrap(), f[3].parse().unwrap())
}

async fn recording_node(root: &Path, database: &str) -> Node {
    let mut cfg = recording_config(root);
    cfg.recording.database = Some(database.to_owned());
    Node::start(cfg).await.expect("node starts")
}

/// A recorded session through the real signaling (a user, an agent who publishes, records
/// an outcome and leaves), then what the database holds of it, read by the library and by
/// `meridian sessions`.
async fn a_recorded_session_is_indexed(database: &str) {
    let root = tempfile::tempdir().unwrap();
    let node = recording_node(root.path(), database).await;
    let (mut user, _) = Signal::join(&node, "kyc-db", "alice", Role::User).await;
    let (mut agent, _) = Signal::join(&node, "kyc-db", "bob", Role::Agent).await;
    let (_producer, _publisher, _task) = publish_as(&mut agent, TestCodec::Vp8).await;
    let r = agent
        .request(json!({"type": "recordOutcome", "outcome": "approved", "note": "documents match"}))
        .await;
    assert_eq!(r["type"], "ok", "{r}");
    agent.send_text(&json!({"type": "leave"}).to_string()).await;
    agent.until_closed().await;
    user.send_text(&json!({"type": "leave"}).to_string()).await;
    user.until_closed().await;

    let db = SessionDb::open(database).await.unwrap();
    let mut runs = Vec::new();
    for _ in 0..100 {
        runs = db.show("kyc-db").await.unwrap();
        if runs.first().is_some_and(|r| r.session.status == "complete") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(runs.len(), 1, "{runs:?}");
    let run = &runs[0];
    assert_eq!(run.session.status, "complete");
    assert_eq!(run.session.outcome.as_deref(), Some("approved"));
    assert_eq!(run.outcome_by.as_deref(), Some("bob"));
    assert_eq!(run.outcome_note.as_deref(), Some("documents match"));
    assert_eq!(run.session.region, "test");
    assert!(run.session.ended_at.is_some());
    let folder = PathBuf::from(&run.session.folder);
    let manifest = std::fs::read(folder.join("manifest.json")).unwrap();
    assert_eq!(
        run.manifest_sha256.as_deref(),
        Some(meridian::compliance::sha256_hex(&manifest).as_str()),
        "the row names the sealed manifest"
    );
    let people: Vec<(&str, &str, Option<&str>)> = run
        .participant_list
        .iter()
        .map(|p| {
            (
                p.user_id.as_str(),
                p.role.as_str(),
                p.left_reason.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        people,
        [
            ("alice", "user", Some("left")),
            ("bob", "agent", Some("left"))
        ]
    );
    // Every audit entry is indexed, with the hash the log's next line carries.
    let log = std::fs::read_to_string(folder.join("audit.jsonl")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(run.entries.len(), lines.len());
    for (e, line) in run.entries.iter().zip(&lines) {
        assert_eq!(
            e.entry_hash,
            meridian::compliance::sha256_hex(line.as_bytes())
        );
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["event"], e.event.as_str());
    }
    let listed = db.list(10).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].participants, 2);

    // The operator's view, through the command.
    let out = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["sessions", "list", "--json", "--database", database])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed[0]["session_id"], "kyc-db");
    assert_eq!(listed[0]["outcome"], "approved");
    let out = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["sessions", "show", "kyc-db", "--database", database])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && shown.contains("outcome  approved by bob"),
        "{shown}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["sessions", "show", "kyc-nosuch", "--database", database])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no session kyc-nosuch"));
}

#[tokio::test]
async fn sessions_are_indexed_in_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("sessions.db").display());
    a_recorded_session_is_indexed(&url).await;
}

#[tokio::test]
async fn sessions_are_indexed_in_postgresql() {
    let pg = Postgres::start();
    a_recorded_session_is_indexed(&pg.url).await;
}

#[tokio::test]
async fn an_unreachable_database_stops_the_node_with_a_clear_error() {
    let root = tempfile::tempdir().unwrap();
    let mut cfg = recording_config(root.path());
    cfg.recording.database = Some("postgres://meridian:secret@127.0.0.1:1/none".into());
    let e = Node::start(cfg).await.err().expect("refused").to_string();
    assert!(e.contains("cannot open the session database"), "{e}");
    assert!(!e.contains("secret"), "no password in messages: {e}");
}
