//! The review page's API, on the node that keeps a session's records: an agent or an auditor
//! (`observer`) holding a token for the session gets its runs (the manifest's verification
//! by this node's key, the participants' files, the audit timeline) and plays the files
//! through short-lived signed links (a `<video>` cannot send an `Authorization` header, and a
//! session token never goes into a URL).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};

use super::AppState;
use crate::auth::Role;
use crate::compliance::recorder::AUDIT_FILE;
use crate::compliance::seal::{verify, Manifest};

/// How long a file link from the review API stays valid.
pub const LINK_TTL: Duration = Duration::from_secs(3600);

use super::api_error as fail;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// What a link's signature covers: what it opens and until when.
fn signed_text(session: &str, run: &str, file: &str, exp: u64) -> String {
    format!("{session}\n{run}\n{file}\n{exp}")
}

/// The link signature: HMAC-SHA256, hex.
fn sign(key: &ring::hmac::Key, session: &str, run: &str, file: &str, exp: u64) -> String {
    let msg = signed_text(session, run, file, exp);
    crate::compliance::hex(ring::hmac::sign(key, msg.as_bytes()).as_ref())
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || s.len() > 128 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A run folder name or a session id: one path component of plain characters.
fn plain(component: &str) -> bool {
    !component.is_empty()
        && !component.starts_with('.')
        && component
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn runs_of(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    v.sort();
    v
}

/// `GET /v1/review/{session}` with `Authorization: Bearer <token>` (agent or observer of
/// that session).
pub async fn review(
    State(s): State<AppState>,
    UrlPath(session): UrlPath<String>,
    headers: axum::http::HeaderMap,
) -> Response {
    let (recorder, claims) = match super::recorder_and_claims(&s, &headers) {
        Ok(r) => r,
        Err(answer) => return *answer,
    };
    if claims.sid.to_string() != session || !plain(&session) {
        return fail(
            &s,
            StatusCode::FORBIDDEN,
            "not_allowed",
            "the token admits to another session".into(),
        );
    }
    if !matches!(claims.role, Role::Agent | Role::Observer) {
        return fail(
            &s,
            StatusCode::FORBIDDEN,
            "not_allowed",
            "only the session's agent or an auditor (observer) reviews its recording".into(),
        );
    }
    let dir = recorder.dir().join(&session);
    let key = recorder.public_key().to_vec();
    let link_key = s.review_key.clone();
    let runs = tokio::task::spawn_blocking(move || {
        runs_of(&dir)
            .iter()
            .map(|run| describe(run, &session, &key, &link_key))
            .collect::<Vec<Value>>()
    })
    .await
    .unwrap_or_default();
    if runs.is_empty() {
        return fail(
            &s,
            StatusCode::NOT_FOUND,
            "not_recorded_here",
            "this node keeps no records of the session".into(),
        );
    }
    (
        [(header::CONTENT_TYPE, "application/json")],
        json!({"session": claims.sid.to_string(), "runs": runs}).to_string(),
    )
        .into_response()
}

/// One run: its verification by this node's key, files with links, and audit entries.
fn describe(run: &Path, session: &str, public_key: &[u8], link_key: &ring::hmac::Key) -> Value {
    let name = run
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let entries: Vec<Value> = std::fs::read_to_string(run.join(AUDIT_FILE))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let sealed = run.join(crate::compliance::seal::MANIFEST).exists();
    let v = sealed.then(|| verify(run, Some(public_key)));
    let exp = now_secs() + LINK_TTL.as_secs();
    let files: Vec<Value> = v
        .as_ref()
        .and_then(|v| v.manifest.as_ref())
        .map(|m: &Manifest| {
            m.files
                .iter()
                .filter(|f| f.path.starts_with("media/"))
                .map(|f| {
                    let sig = sign(link_key, session, &name, &f.path, exp);
                    json!({
                        "file": f.path,
                        "bytes": f.bytes,
                        "url": format!("/v1/review/{session}/{name}/{}?exp={exp}&sig={sig}", f.path),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "run": name,
        "sealed": sealed,
        "status": v.as_ref().and_then(|v| v.manifest.as_ref()).map(|m| json!(m.status)),
        "verified": v.as_ref().is_some_and(|v| v.ok()),
        "faults": v.as_ref().map(|v| v.faults.iter().map(|f| f.to_string()).collect::<Vec<_>>()).unwrap_or_default(),
        "files": files,
        "entries": entries,
    })
}

#[derive(Deserialize)]
pub struct Link {
    exp: u64,
    sig: String,
}

/// `GET /v1/review/{session}/{run}/{*file}?exp=&sig=`: a recording file, by a link the
/// review API signed (ranges served, so players seek).
pub async fn file(
    State(s): State<AppState>,
    UrlPath((session, run, file)): UrlPath<(String, String, String)>,
    Query(link): Query<Link>,
    req: axum::extract::Request,
) -> Response {
    let Some(recorder) = &s.recorder else {
        return fail(
            &s,
            StatusCode::NOT_FOUND,
            "not_recorded",
            "this node does not record sessions".into(),
        );
    };
    let msg = signed_text(&session, &run, &file, link.exp);
    let signed = unhex(&link.sig)
        .is_some_and(|sig| ring::hmac::verify(&s.review_key, msg.as_bytes(), &sig).is_ok());
    if !signed || link.exp < now_secs() {
        return fail(
            &s,
            StatusCode::FORBIDDEN,
            "link_invalid",
            "the link is not one this node signed, or it expired: reload the review page".into(),
        );
    }
    // Signed by us for a file the manifest lists: still, only plain components.
    if !plain(&session)
        || !plain(&run)
        || !file.starts_with("media/")
        || !file.split('/').all(plain)
    {
        return fail(
            &s,
            StatusCode::NOT_FOUND,
            "not_found",
            "no such file".into(),
        );
    }
    let path = recorder.dir().join(&session).join(&run).join(&file);
    let content_type = if file.ends_with(".webm") {
        "video/webm"
    } else {
        "video/x-matroska"
    };
    use tower::ServiceExt;
    match tower_http::services::ServeFile::new_with_mime(
        &path,
        &content_type.parse().expect("a valid MIME type"),
    )
    .oneshot(req)
    .await
    {
        Ok(r) if r.status() != StatusCode::NOT_FOUND => r.into_response(),
        _ => fail(
            &s,
            StatusCode::NOT_FOUND,
            "not_found",
            "no such file".into(),
        ),
    }
}
