//! The audit log: append-only JSON lines, each entry carrying the SHA-256 of the line before
//! it, written to disk (`fsync`) before `append` returns, so a crash loses at most the entry
//! being written.
//!
//! One entry per line: `{"seq":N,"at":"<UTC>","event":"<name>",<fields>,"prev":"<hex>"}`.
//! `seq` counts from 1; `prev` is the SHA-256 of the previous line's bytes (without its
//! newline), 64 zeros for the first. The hash of the last line is what a manifest seals.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::{sha256_hex, utc_rfc3339};

/// The `prev` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Field names every entry carries; an event's own fields may not use them.
const RESERVED: [&str; 4] = ["seq", "at", "event", "prev"];

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("audit log {0} already exists: a session's log is created once")]
    Exists(PathBuf),
    #[error("audit log {path} does not verify, refusing to append to it: {fault}")]
    Broken { path: PathBuf, fault: ChainFault },
    #[error("audit field {0:?} is reserved (seq, at, event and prev are written by the log)")]
    ReservedField(String),
}

/// One appended entry: its number and the hash the next entry will carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub seq: u64,
    pub hash: String,
    /// The entry's `at`.
    pub at: String,
}

/// An open audit log of one session.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: File,
    next_seq: u64,
    last_hash: String,
}

/// What reopening a log after a crash found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reopened {
    /// Complete entries kept.
    pub entries: u64,
    /// Bytes of an incomplete last line, cut off (the entry being written at the crash).
    pub discarded_bytes: usize,
}

impl AuditLog {
    /// Creates the log of a new session; an existing file is never overwritten.
    pub fn create(path: &Path) -> Result<AuditLog, AuditError> {
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => AuditError::Exists(path.to_owned()),
                _ => io(path, e),
            })?;
        sync_dir(path);
        Ok(AuditLog {
            path: path.to_owned(),
            file,
            next_seq: 1,
            last_hash: GENESIS.to_owned(),
        })
    }

    /// Reopens the log of a session after a restart: the chain must verify; an incomplete
    /// last line (cut by a crash) is removed so the next entry follows the last complete one.
    pub fn reopen(path: &Path) -> Result<(AuditLog, Reopened), AuditError> {
        let bytes = std::fs::read(path).map_err(|e| io(path, e))?;
        let report = verify_chain(&bytes);
        // An incomplete last line is the entry a crash cut: removed below.
        let broken = report
            .faults
            .into_iter()
            .find(|f| !matches!(f, ChainFault::Incomplete { .. }));
        if let Some(fault) = broken {
            return Err(AuditError::Broken {
                path: path.to_owned(),
                fault,
            });
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| io(path, e))?;
        if report.complete_bytes < bytes.len() {
            file.set_len(report.complete_bytes as u64)
                .and_then(|_| file.sync_data())
                .map_err(|e| io(path, e))?;
        }
        file.seek(SeekFrom::End(0)).map_err(|e| io(path, e))?;
        Ok((
            AuditLog {
                path: path.to_owned(),
                file,
                next_seq: report.entries + 1,
                last_hash: report.last_hash,
            },
            Reopened {
                entries: report.entries,
                discarded_bytes: bytes.len() - report.complete_bytes,
            },
        ))
    }

    /// Appends one entry and returns once it is on disk.
    pub fn append(
        &mut self,
        event: &str,
        fields: Map<String, Value>,
    ) -> Result<Appended, AuditError> {
        if let Some(k) = fields.keys().find(|k| RESERVED.contains(&k.as_str())) {
            return Err(AuditError::ReservedField(k.clone()));
        }
        let mut entry = Map::new();
        let at = utc_rfc3339(std::time::SystemTime::now());
        entry.insert("seq".into(), self.next_seq.into());
        entry.insert("at".into(), at.clone().into());
        entry.insert("event".into(), event.into());
        entry.extend(fields);
        entry.insert("prev".into(), self.last_hash.clone().into());
        let mut line = serde_json::to_vec(&Value::Object(entry)).expect("JSON values serialize");
        let hash = sha256_hex(&line);
        line.push(b'\n');
        // One write of the whole line, then to disk: a crash leaves at most this line cut.
        self.file
            .write_all(&line)
            .and_then(|_| self.file.sync_data())
            .map_err(|e| io(&self.path, e))?;
        let appended = Appended {
            seq: self.next_seq,
            hash: hash.clone(),
            at,
        };
        self.next_seq += 1;
        self.last_hash = hash;
        Ok(appended)
    }

    /// Entries written so far.
    pub fn entries(&self) -> u64 {
        self.next_seq - 1
    }

    /// The hash of the last entry (what a manifest seals).
    pub fn last_hash(&self) -> &str {
        &self.last_hash
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn io(path: &Path, source: std::io::Error) -> AuditError {
    AuditError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Makes a new file's directory entry durable too (best effort: not every filesystem can).
fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// Something wrong in a log, named by line (1-based) and entry number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainFault {
    #[error("line {line} is not an audit entry ({why})")]
    Malformed { line: usize, why: String },
    #[error("entry {first}{} missing: line {line} holds entry {found}", plural(*first, *found))]
    Missing { line: usize, first: u64, found: u64 },
    #[error("entries {a} and {b} are swapped (lines {line} and {})", line + 1)]
    Swapped { line: usize, a: u64, b: u64 },
    #[error(
        "line {line} holds entry {found} where entry {expected} belongs (out of order or repeated)"
    )]
    OutOfOrder {
        line: usize,
        expected: u64,
        found: u64,
    },
    #[error("entry {seq} (line {line}) was altered: the next entry names another predecessor")]
    Altered { line: usize, seq: u64 },
    #[error("line {line} is incomplete (cut while being written)")]
    Incomplete { line: usize },
}

fn plural(first: u64, found: u64) -> String {
    if found > first + 1 {
        format!(" to {} are", found - 1)
    } else {
        " is".to_owned()
    }
}

/// What [`verify_chain`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainReport {
    /// Complete entries read.
    pub entries: u64,
    /// Hash of the last complete line.
    pub last_hash: String,
    /// Bytes up to the end of the last complete line.
    pub complete_bytes: usize,
    pub faults: Vec<ChainFault>,
}

struct Line {
    number: usize,
    seq: u64,
    prev: String,
    hash: String,
}

/// Checks a log's chain: numbering, links, and that every line is a complete entry. Every
/// fault is named; an incomplete last line is one (a reopened log cuts it instead).
pub fn verify_chain(bytes: &[u8]) -> ChainReport {
    let mut faults = Vec::new();
    let mut lines = Vec::new();
    let mut complete_bytes = 0;
    let mut at = 0;
    let mut number = 0;
    while at < bytes.len() {
        number += 1;
        let Some(len) = bytes[at..].iter().position(|&b| b == b'\n') else {
            faults.push(ChainFault::Incomplete { line: number });
            break;
        };
        let raw = &bytes[at..at + len];
        at += len + 1;
        complete_bytes = at;
        match parse_line(raw) {
            Ok((seq, prev)) => lines.push(Line {
                number,
                seq,
                prev,
                hash: sha256_hex(raw),
            }),
            Err(why) => faults.push(ChainFault::Malformed { line: number, why }),
        }
    }
    let mut expected = 1u64;
    let mut last_hash = GENESIS.to_owned();
    // After a fault the next link is not judged again (it would report the same damage).
    let mut judge_link = true;
    let mut i = 0;
    while i < lines.len() {
        let l = &lines[i];
        if l.seq == expected {
            if judge_link && l.prev != last_hash {
                // The line before was changed after the fact (or this link was).
                let before = lines[..i].last();
                faults.push(ChainFault::Altered {
                    line: before.map_or(l.number, |b| b.number),
                    seq: before.map_or(l.seq, |b| b.seq),
                });
            }
            judge_link = true;
            expected += 1;
        } else if l.seq == expected + 1 && lines.get(i + 1).is_some_and(|n| n.seq == expected) {
            faults.push(ChainFault::Swapped {
                line: l.number,
                a: expected,
                b: expected + 1,
            });
            // Continue after the pair, from the hash of the later entry of the two.
            last_hash = l.hash.clone();
            expected += 2;
            judge_link = false;
            i += 2;
            continue;
        } else if l.seq > expected {
            faults.push(ChainFault::Missing {
                line: l.number,
                first: expected,
                found: l.seq,
            });
            expected = l.seq + 1;
            judge_link = true;
        } else {
            faults.push(ChainFault::OutOfOrder {
                line: l.number,
                expected,
                found: l.seq,
            });
            judge_link = false;
        }
        last_hash = l.hash.clone();
        i += 1;
    }
    ChainReport {
        entries: lines.len() as u64,
        last_hash,
        complete_bytes,
        faults,
    }
}

fn parse_line(raw: &[u8]) -> Result<(u64, String), String> {
    let v: Value = serde_json::from_slice(raw).map_err(|e| e.to_string())?;
    let seq = v["seq"].as_u64().ok_or("no seq")?;
    let prev = v["prev"].as_str().ok_or("no prev")?;
    if prev.len() != 64 || !prev.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("prev is not a SHA-256".into());
    }
    if v["at"].as_str().is_none() || v["event"].as_str().is_none() {
        return Err("no at or event".into());
    }
    Ok((seq, prev.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    /// A log of `n` entries, as lines.
    fn log(n: u64) -> (tempfile::TempDir, PathBuf, Vec<String>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut log = AuditLog::create(&path).unwrap();
        for i in 0..n {
            log.append(
                "participant_joined",
                fields(json!({ "user": format!("u{i}") })),
            )
            .unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let lines = text.lines().map(str::to_owned).collect();
        (dir, path, lines)
    }

    fn check(lines: &[String]) -> Vec<ChainFault> {
        let mut text = lines.join("\n");
        text.push('\n');
        verify_chain(text.as_bytes()).faults
    }

    #[test]
    fn an_untouched_log_verifies_and_each_entry_names_its_predecessor() {
        let (_d, path, lines) = log(5);
        let report = verify_chain(&std::fs::read(&path).unwrap());
        assert_eq!(report.faults, vec![]);
        assert_eq!(report.entries, 5);
        assert_eq!(report.last_hash, sha256_hex(lines[4].as_bytes()));
        let second: Value = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(second["prev"], sha256_hex(lines[0].as_bytes()));
        assert_eq!(second["seq"], 2);
        assert!(second["at"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn removed_altered_swapped_and_cut_entries_are_named() {
        let (_d, _p, lines) = log(6);
        let mut removed = lines.clone();
        removed.remove(2);
        assert_eq!(
            check(&removed),
            vec![ChainFault::Missing {
                line: 3,
                first: 3,
                found: 4
            }]
        );
        let mut altered = lines.clone();
        altered[2] = altered[2].replace("\"u2\"", "\"mallory\"");
        assert_eq!(
            check(&altered),
            vec![ChainFault::Altered { line: 3, seq: 3 }]
        );
        let mut swapped = lines.clone();
        swapped.swap(3, 4);
        assert_eq!(
            check(&swapped),
            vec![ChainFault::Swapped {
                line: 4,
                a: 4,
                b: 5
            }]
        );
        let mut text = lines.join("\n");
        text.push('\n');
        text.push_str(r#"{"seq":7,"at":"#);
        assert_eq!(
            verify_chain(text.as_bytes()).faults,
            vec![ChainFault::Incomplete { line: 7 }]
        );
        let mut garbage = lines.clone();
        garbage[1] = "not json".into();
        assert!(matches!(
            check(&garbage)[0],
            ChainFault::Malformed { line: 2, .. }
        ));
    }

    #[test]
    fn a_reopened_log_drops_the_cut_entry_and_continues_the_chain() {
        let (_d, path, lines) = log(3);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"seq":4,"at":"2026-"#).unwrap();
        drop(f);
        let (mut log, reopened) = AuditLog::reopen(&path).unwrap();
        assert_eq!(reopened.entries, 3);
        assert_eq!(reopened.discarded_bytes, 20);
        assert_eq!(log.last_hash(), sha256_hex(lines[2].as_bytes()));
        log.append("node_restarted", Map::new()).unwrap();
        let report = verify_chain(&std::fs::read(&path).unwrap());
        assert_eq!(report.faults, vec![]);
        assert_eq!(report.entries, 4);
    }

    #[test]
    fn a_log_is_created_once_and_never_appended_to_when_broken() {
        let (_d, path, lines) = log(3);
        assert!(matches!(
            AuditLog::create(&path),
            Err(AuditError::Exists(_))
        ));
        let altered = lines.join("\n").replace("\"u0\"", "\"x\"") + "\n";
        std::fs::write(&path, altered).unwrap();
        let err = AuditLog::reopen(&path).unwrap_err();
        assert!(
            err.to_string().contains("entry 1 (line 1) was altered"),
            "{err}"
        );
        let (_d2, path2, _) = log(0);
        let mut fresh = AuditLog::reopen(&path2).unwrap().0;
        assert!(matches!(
            fresh.append("x", fields(json!({"prev": "forged"}))),
            Err(AuditError::ReservedField(_))
        ));
    }
}
