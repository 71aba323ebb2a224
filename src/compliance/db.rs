//! Session records in a database: sessions, participants, recordings (where each sealed
//! folder lives), outcomes and an index of every audit entry. SQLite by default (a file
//! beside the recordings, nothing to install), PostgreSQL in production, through the same
//! code: sqlx's `Any` driver, SQL that both accept, numbered parameters. The folder stays
//! the record that is sealed and verified; the database is its index, filled from the audit
//! entries as they are written (`meridian sessions list|show` reads it).

use std::borrow::Cow;

use futures_util::future::BoxFuture;
use serde::Serialize;
use serde_json::Value;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::{AnyPool, Row};

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot open the session database {url}: {source}")]
    Open { url: String, source: sqlx::Error },
    #[error("cannot bring the session database {url} up to date: {source}")]
    Migrate {
        url: String,
        source: sqlx::migrate::MigrateError,
    },
    #[error("session database: {0}")]
    Query(#[from] sqlx::Error),
}

/// Longest a connection to the database is waited for.
pub const OPEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The schema, in order. Each step runs once (sqlx's migrator keeps the list in
/// `_sqlx_migrations`); a step already applied is never edited, only followed by another.
const SCHEMA: &[(i64, &str, &str)] = &[
    (
        1,
        "sessions participants recordings audit index",
        "CREATE TABLE IF NOT EXISTS sessions (
        session_id TEXT NOT NULL,
        run TEXT NOT NULL,
        node TEXT NOT NULL,
        region TEXT NOT NULL,
        folder TEXT NOT NULL,
        started_at TEXT NOT NULL,
        ended_at TEXT,
        status TEXT NOT NULL,
        outcome TEXT,
        outcome_note TEXT,
        outcome_by TEXT,
        manifest_sha256 TEXT,
        PRIMARY KEY (session_id, run)
    );
    CREATE TABLE IF NOT EXISTS participants (
        session_id TEXT NOT NULL,
        run TEXT NOT NULL,
        participant_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        role TEXT NOT NULL,
        node TEXT NOT NULL,
        region TEXT NOT NULL,
        joined_at TEXT NOT NULL,
        left_at TEXT,
        left_reason TEXT,
        PRIMARY KEY (session_id, run, participant_id)
    );
    CREATE TABLE IF NOT EXISTS recordings (
        session_id TEXT NOT NULL,
        run TEXT NOT NULL,
        file TEXT NOT NULL,
        user_id TEXT NOT NULL,
        role TEXT NOT NULL,
        tracks TEXT NOT NULL,
        bytes BIGINT NOT NULL,
        duration_ms BIGINT NOT NULL,
        error TEXT,
        PRIMARY KEY (session_id, run, file)
    );
    CREATE TABLE IF NOT EXISTS audit_entries (
        session_id TEXT NOT NULL,
        run TEXT NOT NULL,
        seq BIGINT NOT NULL,
        at TEXT NOT NULL,
        event TEXT NOT NULL,
        user_id TEXT,
        entry_hash TEXT NOT NULL,
        PRIMARY KEY (session_id, run, seq)
    );
    CREATE INDEX IF NOT EXISTS sessions_started ON sessions (started_at);",
    ),
    (
        2,
        "where each run is stored",
        "ALTER TABLE sessions ADD COLUMN stored_url TEXT;
         ALTER TABLE sessions ADD COLUMN stored_at TEXT;",
    ),
];

#[derive(Debug)]
struct Schema;

impl<'s> MigrationSource<'s> for Schema {
    fn resolve(self) -> BoxFuture<'s, Result<Vec<Migration>, sqlx::error::BoxDynError>> {
        Box::pin(async {
            Ok(SCHEMA
                .iter()
                .map(|(version, description, sql)| {
                    Migration::new(
                        *version,
                        Cow::Borrowed(*description),
                        MigrationType::Simple,
                        Cow::Borrowed(*sql),
                        false,
                    )
                })
                .collect())
        })
    }
}

/// What the recorder tells the database.
#[derive(Debug, Clone)]
pub enum DbUpdate {
    /// An audit entry was written to a session run's log.
    Entry {
        session: String,
        run: String,
        node: String,
        region: String,
        folder: String,
        seq: u64,
        at: String,
        event: String,
        hash: String,
        fields: Value,
    },
    /// A session run was sealed.
    Sealed {
        session: String,
        run: String,
        status: String,
        manifest_sha256: String,
    },
}

/// One session run, as `meridian sessions list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionRow {
    pub session_id: String,
    pub run: String,
    pub node: String,
    pub region: String,
    pub folder: String,
    pub started_at: String,
    pub ended_at: Option<String>,
    pub status: String,
    pub outcome: Option<String>,
    pub participants: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParticipantRow {
    pub participant_id: String,
    pub user_id: String,
    pub role: String,
    pub node: String,
    pub region: String,
    pub joined_at: String,
    pub left_at: Option<String>,
    pub left_reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecordingRow {
    pub file: String,
    pub user_id: String,
    pub role: String,
    pub tracks: String,
    pub bytes: i64,
    pub duration_ms: i64,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EntryRow {
    pub seq: i64,
    pub at: String,
    pub event: String,
    pub user_id: Option<String>,
    pub entry_hash: String,
}

/// One session run in full, as `meridian sessions show` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionDetail {
    #[serde(flatten)]
    pub session: SessionRow,
    pub outcome_note: Option<String>,
    pub outcome_by: Option<String>,
    pub manifest_sha256: Option<String>,
    /// Where the sealed folder was copied and checked (`s3://bucket/key/`), and when.
    pub stored_url: Option<String>,
    pub stored_at: Option<String>,
    pub participant_list: Vec<ParticipantRow>,
    pub recordings: Vec<RecordingRow>,
    pub entries: Vec<EntryRow>,
}

#[derive(Clone)]
pub struct SessionDb {
    pool: AnyPool,
    sqlite: bool,
}

fn text(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_owned)
}

impl SessionDb {
    /// Connects (creating a SQLite file when missing) and brings the schema up to date.
    pub async fn open(url: &str) -> Result<SessionDb, DbError> {
        sqlx::any::install_default_drivers();
        let sqlite = url.starts_with("sqlite:");
        let connect = if sqlite && !url.contains("mode=") {
            let sep = if url.contains('?') { '&' } else { '?' };
            format!("{url}{sep}mode=rwc")
        } else {
            url.to_owned()
        };
        let pool = AnyPoolOptions::new()
            .max_connections(if sqlite { 1 } else { 4 })
            // An unreachable server is an error at start, said promptly.
            .acquire_timeout(OPEN_TIMEOUT)
            .connect(&connect)
            .await
            .map_err(|source| DbError::Open {
                url: redact(url),
                source,
            })?;
        let migrator = Migrator::new(Schema)
            .await
            .map_err(|source| DbError::Migrate {
                url: redact(url),
                source,
            })?;
        migrator
            .run(&pool)
            .await
            .map_err(|source| DbError::Migrate {
                url: redact(url),
                source,
            })?;
        Ok(SessionDb { pool, sqlite })
    }

    /// `$n` parameters, as written here, in the form the backend takes (`?n` for SQLite).
    fn sql<'a>(&self, q: &'a str) -> Cow<'a, str> {
        if self.sqlite {
            Cow::Owned(q.replace('$', "?"))
        } else {
            Cow::Borrowed(q)
        }
    }

    pub async fn apply(&self, u: &DbUpdate) -> Result<(), DbError> {
        match u {
            DbUpdate::Sealed {
                session,
                run,
                status,
                manifest_sha256,
            } => {
                sqlx::query(&self.sql(
                    "UPDATE sessions SET status = $1, manifest_sha256 = $2 WHERE session_id = $3 AND run = $4",
                ))
                .bind(status)
                .bind(manifest_sha256)
                .bind(session)
                .bind(run)
                .execute(&self.pool)
                .await?;
            }
            DbUpdate::Entry {
                session,
                run,
                node,
                region,
                folder,
                seq,
                at,
                event,
                hash,
                fields,
            } => {
                self.entry(
                    session, run, node, region, folder, *seq, at, event, hash, fields,
                )
                .await?
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn entry(
        &self,
        session: &str,
        run: &str,
        node: &str,
        region: &str,
        folder: &str,
        seq: u64,
        at: &str,
        event: &str,
        hash: &str,
        f: &Value,
    ) -> Result<(), DbError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(&self.sql(
            "INSERT INTO audit_entries (session_id, run, seq, at, event, user_id, entry_hash)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
        ))
        .bind(session)
        .bind(run)
        .bind(seq as i64)
        .bind(at)
        .bind(event)
        .bind(text(f, "user"))
        .bind(hash)
        .execute(&mut *tx)
        .await?;
        match event {
            "session_created" => {
                sqlx::query(&self.sql(
                    "INSERT INTO sessions (session_id, run, node, region, folder, started_at, status)
                     VALUES ($1, $2, $3, $4, $5, $6, 'open') ON CONFLICT DO NOTHING",
                ))
                .bind(session)
                .bind(run)
                .bind(node)
                .bind(region)
                .bind(folder)
                .bind(at)
                .execute(&mut *tx)
                .await?;
            }
            "participant_joined" => {
                sqlx::query(&self.sql(
                    "INSERT INTO participants (session_id, run, participant_id, user_id, role, node, region, joined_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
                ))
                .bind(session)
                .bind(run)
                .bind(text(f, "participant").unwrap_or_default())
                .bind(text(f, "user").unwrap_or_default())
                .bind(text(f, "role").unwrap_or_default())
                .bind(text(f, "node").unwrap_or_else(|| node.to_owned()))
                .bind(text(f, "region").unwrap_or_else(|| region.to_owned()))
                .bind(at)
                .execute(&mut *tx)
                .await?;
            }
            "participant_left" => {
                sqlx::query(&self.sql(
                    "UPDATE participants SET left_at = $1, left_reason = $2
                     WHERE session_id = $3 AND run = $4 AND participant_id = $5",
                ))
                .bind(at)
                .bind(text(f, "reason"))
                .bind(session)
                .bind(run)
                .bind(text(f, "participant").unwrap_or_default())
                .execute(&mut *tx)
                .await?;
            }
            "outcome_recorded" => {
                sqlx::query(&self.sql(
                    "UPDATE sessions SET outcome = $1, outcome_note = $2, outcome_by = $3
                     WHERE session_id = $4 AND run = $5",
                ))
                .bind(text(f, "outcome"))
                .bind(text(f, "note"))
                .bind(text(f, "user"))
                .bind(session)
                .bind(run)
                .execute(&mut *tx)
                .await?;
            }
            "recording_stopped" => {
                let tracks = f
                    .get("tracks")
                    .and_then(Value::as_array)
                    .map(|t| {
                        t.iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_default();
                sqlx::query(&self.sql(
                    "INSERT INTO recordings (session_id, run, file, user_id, role, tracks, bytes, duration_ms, error)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
                ))
                .bind(session)
                .bind(run)
                .bind(text(f, "file").unwrap_or_default())
                .bind(text(f, "user").unwrap_or_default())
                .bind(text(f, "role").unwrap_or_default())
                .bind(tracks)
                .bind(f.get("bytes").and_then(Value::as_i64).unwrap_or(0))
                .bind(f.get("duration_ms").and_then(Value::as_i64).unwrap_or(0))
                .bind(text(f, "error"))
                .execute(&mut *tx)
                .await?;
            }
            "session_ended" | "session_interrupted" => {
                let status = if event == "session_ended" {
                    "ended"
                } else {
                    "interrupted"
                };
                sqlx::query(&self.sql(
                    "UPDATE sessions SET ended_at = $1, status = $2 WHERE session_id = $3 AND run = $4",
                ))
                .bind(at)
                .bind(status)
                .bind(session)
                .bind(run)
                .execute(&mut *tx)
                .await?;
            }
            _ => {}
        }
        tx.commit().await?;
        Ok(())
    }

    /// A run's sealed folder was copied to `url` and checked there.
    pub async fn mark_stored(&self, session: &str, run: &str, url: &str) -> Result<(), DbError> {
        sqlx::query(&self.sql(
            "UPDATE sessions SET stored_url = $1, stored_at = $2 WHERE session_id = $3 AND run = $4",
        ))
        .bind(url)
        .bind(super::utc_rfc3339(std::time::SystemTime::now()))
        .bind(session)
        .bind(run)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Sealed runs not stored yet: (session, run, folder).
    pub async fn unstored(&self) -> Result<Vec<(String, String, String)>, DbError> {
        let rows = sqlx::query(
            "SELECT session_id, run, folder FROM sessions
             WHERE manifest_sha256 IS NOT NULL AND stored_at IS NULL ORDER BY started_at",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect()
    }

    /// The latest session runs, newest first.
    pub async fn list(&self, limit: i64) -> Result<Vec<SessionRow>, DbError> {
        let rows = sqlx::query(&self.sql(
            "SELECT s.session_id, s.run, s.node, s.region, s.folder, s.started_at, s.ended_at,
                    s.status, s.outcome,
                    (SELECT COUNT(*) FROM participants p
                      WHERE p.session_id = s.session_id AND p.run = s.run) AS participants
             FROM sessions s ORDER BY s.started_at DESC, s.session_id LIMIT $1",
        ))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(session_row).collect()
    }

    /// Every run of `session`, oldest first, with its participants, files and entries.
    pub async fn show(&self, session: &str) -> Result<Vec<SessionDetail>, DbError> {
        let rows = sqlx::query(&self.sql(
            "SELECT s.session_id, s.run, s.node, s.region, s.folder, s.started_at, s.ended_at,
                    s.status, s.outcome,
                    (SELECT COUNT(*) FROM participants p
                      WHERE p.session_id = s.session_id AND p.run = s.run) AS participants,
                    s.outcome_note, s.outcome_by, s.manifest_sha256, s.stored_url, s.stored_at
             FROM sessions s WHERE s.session_id = $1 ORDER BY s.started_at",
        ))
        .bind(session)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::new();
        for r in &rows {
            let s = session_row(r)?;
            let run = s.run.clone();
            let participant_list = sqlx::query(&self.sql(
                "SELECT participant_id, user_id, role, node, region, joined_at, left_at, left_reason
                 FROM participants WHERE session_id = $1 AND run = $2 ORDER BY joined_at, participant_id",
            ))
            .bind(session)
            .bind(&run)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|p| {
                Ok(ParticipantRow {
                    participant_id: p.try_get(0)?,
                    user_id: p.try_get(1)?,
                    role: p.try_get(2)?,
                    node: p.try_get(3)?,
                    region: p.try_get(4)?,
                    joined_at: p.try_get(5)?,
                    left_at: p.try_get(6)?,
                    left_reason: p.try_get(7)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()?;
            let recordings = sqlx::query(&self.sql(
                "SELECT file, user_id, role, tracks, bytes, duration_ms, error
                 FROM recordings WHERE session_id = $1 AND run = $2 ORDER BY file",
            ))
            .bind(session)
            .bind(&run)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|f| {
                Ok(RecordingRow {
                    file: f.try_get(0)?,
                    user_id: f.try_get(1)?,
                    role: f.try_get(2)?,
                    tracks: f.try_get(3)?,
                    bytes: f.try_get(4)?,
                    duration_ms: f.try_get(5)?,
                    error: f.try_get(6)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()?;
            let entries = sqlx::query(&self.sql(
                "SELECT seq, at, event, user_id, entry_hash
                 FROM audit_entries WHERE session_id = $1 AND run = $2 ORDER BY seq",
            ))
            .bind(session)
            .bind(&run)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|e| {
                Ok(EntryRow {
                    seq: e.try_get(0)?,
                    at: e.try_get(1)?,
                    event: e.try_get(2)?,
                    user_id: e.try_get(3)?,
                    entry_hash: e.try_get(4)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()?;
            out.push(SessionDetail {
                session: s,
                outcome_note: r.try_get(10)?,
                outcome_by: r.try_get(11)?,
                manifest_sha256: r.try_get(12)?,
                stored_url: r.try_get(13)?,
                stored_at: r.try_get(14)?,
                participant_list,
                recordings,
                entries,
            });
        }
        Ok(out)
    }
}

fn session_row(r: &AnyRow) -> Result<SessionRow, DbError> {
    Ok(SessionRow {
        session_id: r.try_get(0)?,
        run: r.try_get(1)?,
        node: r.try_get(2)?,
        region: r.try_get(3)?,
        folder: r.try_get(4)?,
        started_at: r.try_get(5)?,
        ended_at: r.try_get(6)?,
        status: r.try_get(7)?,
        outcome: r.try_get(8)?,
        participants: r.try_get(9)?,
    })
}

/// A database URL without its password, for messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &creds[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact("postgres://meridian:s3cret@db.internal:5432/meridian"),
            "postgres://meridian:***@db.internal:5432/meridian"
        );
        assert_eq!(
            redact("sqlite:///var/lib/meridian/sessions.db"),
            "sqlite:///var/lib/meridian/sessions.db"
        );
    }
}
