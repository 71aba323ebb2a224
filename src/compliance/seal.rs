//! Sealing a session folder and verifying it.
//!
//! `manifest.json` lists every file of the folder with its SHA-256 and size, the audit log's
//! entry count and final hash, and the session's metadata; `manifest.sig` is the recording
//! node's Ed25519 signature over the exact bytes of `manifest.json` (hex). [`verify`] names
//! every fault it finds: a changed, missing or added file, a broken audit chain, an audit log
//! that is not the one sealed, a signature that does not match, or a key other than the
//! trusted one.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};

use super::audit::{verify_chain, AuditLog, ChainFault};
use super::{hex, sha256_hex, utc_rfc3339};

pub const MANIFEST: &str = "manifest.json";
pub const SIGNATURE: &str = "manifest.sig";
/// The manifest while it is written: renamed to [`MANIFEST`] once whole and on disk, so a
/// reader (or a crash) never meets a half-written manifest.
const MANIFEST_PARTIAL: &str = "manifest.json.partial";
pub const FORMAT: &str = "meridian-session/1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SealStatus {
    /// The session ended and was sealed by the node that recorded it.
    Complete,
    /// The node stopped mid-session (crash or kill) and sealed what it had on restart.
    Interrupted,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Relative to the folder, `/`-separated.
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSeal {
    pub path: String,
    pub entries: u64,
    pub final_hash: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub session: String,
    pub status: SealStatus,
    /// UTC, RFC 3339.
    pub sealed_at: String,
    pub files: Vec<FileEntry>,
    pub audit: AuditSeal,
    /// Participants, roles, regions, start and end, outcome: whatever the recorder knows.
    pub metadata: serde_json::Value,
    /// The signing node's Ed25519 public key, hex.
    pub signing_key: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is already sealed (it holds a manifest)")]
    AlreadySealed(PathBuf),
    #[error("the audit log {0} is not inside the folder being sealed")]
    AuditOutside(PathBuf),
    #[error("signing key {path}: {why}")]
    Key { path: PathBuf, why: String },
}

fn io(path: &Path, source: std::io::Error) -> SealError {
    SealError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A node's recording signing key (Ed25519, PKCS#8 PEM on disk).
pub struct SigningKey {
    pair: Ed25519KeyPair,
}

impl SigningKey {
    /// Reads the key at `path`.
    pub fn load(path: &Path) -> Result<SigningKey, SealError> {
        let text = std::fs::read_to_string(path).map_err(|e| io(path, e))?;
        let der = pem_der(&text, "PRIVATE KEY").ok_or_else(|| SealError::Key {
            path: path.to_owned(),
            why: "not a PEM \"PRIVATE KEY\" (PKCS#8)".into(),
        })?;
        let pair =
            Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der).map_err(|e| SealError::Key {
                path: path.to_owned(),
                why: format!("not an Ed25519 key: {e}"),
            })?;
        Ok(SigningKey { pair })
    }

    /// Reads the key at `path`, creating it (mode 0600) if there is none: for `dev`.
    pub fn load_or_create(path: &Path) -> Result<SigningKey, SealError> {
        if !path.exists() {
            let (private, public) = crate::auth::generate_ed25519_pem();
            write_private(path, &private)?;
            let public_path = path.with_extension("pub.pem");
            std::fs::write(&public_path, public).map_err(|e| io(&public_path, e))?;
        }
        Self::load(path)
    }

    /// The public key, hex (what a manifest names and `--public-key` accepts).
    pub fn public_hex(&self) -> String {
        hex(self.pair.public_key().as_ref())
    }

    /// The public key's 32 bytes.
    pub fn public_key(&self) -> Vec<u8> {
        self.pair.public_key().as_ref().to_vec()
    }

    fn sign(&self, bytes: &[u8]) -> String {
        hex(self.pair.sign(bytes).as_ref())
    }
}

fn write_private(path: &Path, pem: &str) -> Result<(), SealError> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path).map_err(|e| io(path, e))?;
    f.write_all(pem.as_bytes()).map_err(|e| io(path, e))
}

/// The DER inside a PEM block labelled `label`.
fn pem_der(text: &str, label: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let body = text.split(&begin).nth(1)?.split(&end).next()?;
    let b64: String = body.split_whitespace().collect();
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

/// A public key given on the command line: a PEM file (SPKI, as `load_or_create` writes
/// beside the private key), or 64 hex digits.
pub fn parse_public_key(arg: &str) -> Result<Vec<u8>, String> {
    let arg = arg.trim();
    if arg.len() == 64 {
        if let Some(k) = unhex(arg) {
            return Ok(k);
        }
    }
    let text = std::fs::read_to_string(arg)
        .map_err(|e| format!("{arg:?} is neither 64 hex digits nor a readable key file: {e}"))?;
    let der = pem_der(&text, "PUBLIC KEY")
        .ok_or_else(|| format!("{arg}: no PEM \"PUBLIC KEY\" block"))?;
    // SPKI for Ed25519: a 12-byte header, then the 32-byte key.
    const HEADER: [u8; 12] = [
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    match der.strip_prefix(&HEADER[..]) {
        Some(k) if k.len() == 32 => Ok(k.to_vec()),
        _ => Err(format!("{arg}: not an Ed25519 public key")),
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Seals `dir`: hashes every file in it (the audit log among them), writes the manifest
/// and its signature. The audit log must be inside `dir` and no longer written to.
pub fn seal(
    dir: &Path,
    session: &str,
    status: SealStatus,
    audit: &AuditLog,
    metadata: serde_json::Value,
    key: &SigningKey,
) -> Result<Manifest, SealError> {
    let manifest_path = dir.join(MANIFEST);
    if manifest_path.exists() {
        return Err(SealError::AlreadySealed(dir.to_owned()));
    }
    let audit_rel = audit
        .path()
        .strip_prefix(dir)
        .ok()
        .and_then(relative)
        .ok_or_else(|| SealError::AuditOutside(audit.path().to_owned()))?;
    let mut files = Vec::new();
    for rel in list_files(dir).map_err(|e| io(dir, e))? {
        let path = dir.join(&rel);
        let bytes = std::fs::read(&path).map_err(|e| io(&path, e))?;
        files.push(FileEntry {
            path: rel,
            sha256: sha256_hex(&bytes),
            bytes: bytes.len() as u64,
        });
    }
    let manifest = Manifest {
        format: FORMAT.into(),
        session: session.into(),
        status,
        sealed_at: utc_rfc3339(std::time::SystemTime::now()),
        files,
        audit: AuditSeal {
            path: audit_rel,
            entries: audit.entries(),
            final_hash: audit.last_hash().into(),
        },
        metadata,
        signing_key: key.public_hex(),
    };
    let mut text = serde_json::to_vec_pretty(&manifest).expect("manifests serialize");
    text.push(b'\n');
    let sig = key.sign(&text);
    // The signature first: a manifest without one is not mistaken for a sealed folder.
    let sig_path = dir.join(SIGNATURE);
    write_synced(&sig_path, format!("{sig}\n").as_bytes())?;
    let partial = dir.join(MANIFEST_PARTIAL);
    write_synced(&partial, &text)?;
    std::fs::rename(&partial, &manifest_path).map_err(|e| io(&manifest_path, e))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(manifest)
}

/// Writes `bytes` to `path` and waits until they are on disk.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), SealError> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(|e| io(path, e))?;
    f.write_all(bytes).map_err(|e| io(path, e))?;
    f.sync_all().map_err(|e| io(path, e))
}

/// `rel` as a `/`-separated relative path, if it is one (no `..`, not absolute).
fn relative(rel: &Path) -> Option<String> {
    let parts: Option<Vec<&str>> = rel
        .components()
        .map(|c| match c {
            std::path::Component::Normal(s) => s.to_str(),
            _ => None,
        })
        .collect();
    let parts = parts?;
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// Every regular file under `dir` but the manifest and its signature, sorted, relative.
fn list_files(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            let path = entry.path();
            if kind.is_dir() {
                stack.push(path);
            } else if let Some(rel) = path.strip_prefix(dir).ok().and_then(relative) {
                if rel != MANIFEST && rel != SIGNATURE && rel != MANIFEST_PARTIAL {
                    out.insert(rel);
                }
            }
        }
    }
    Ok(out.into_iter().collect())
}

/// One thing wrong with a sealed folder.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    #[error("no {MANIFEST}: the folder was never sealed, or the manifest was removed")]
    ManifestMissing,
    #[error("{MANIFEST} is unreadable: {0}")]
    ManifestUnreadable(String),
    #[error("no {SIGNATURE}: the manifest is unsigned")]
    SignatureMissing,
    #[error("the manifest does not match its signature: changed after sealing, or signed with a key other than the one it names")]
    SignatureInvalid,
    #[error("signed by key {found}, not by the trusted key {trusted}")]
    UntrustedKey { found: String, trusted: String },
    #[error("{0} is listed in the manifest but missing")]
    FileMissing(String),
    #[error("{path} changed since sealing (SHA-256 {found}, sealed {sealed})")]
    FileChanged {
        path: String,
        sealed: String,
        found: String,
    },
    #[error("{0} was added after sealing (not in the manifest)")]
    FileAdded(String),
    #[error("audit log: {0}")]
    Audit(ChainFault),
    #[error("the audit log is not the one sealed: it ends at entry {entries} with hash {hash}, the manifest sealed {sealed_entries} entries ending in {sealed_hash}")]
    AuditNotSealed {
        entries: u64,
        hash: String,
        sealed_entries: u64,
        sealed_hash: String,
    },
}

/// What [`verify`] found.
#[derive(Debug)]
pub struct Verification {
    pub manifest: Option<Manifest>,
    pub faults: Vec<Fault>,
}

impl Verification {
    pub fn ok(&self) -> bool {
        self.faults.is_empty()
    }
}

/// Checks a sealed folder: signature (against `trusted` when given, else against the key the
/// manifest names), every file's hash and size, no file added, and the audit chain and its
/// sealed end. Reads only.
pub fn verify(dir: &Path, trusted: Option<&[u8]>) -> Verification {
    let mut faults = Vec::new();
    let manifest_bytes = match std::fs::read(dir.join(MANIFEST)) {
        Ok(b) => b,
        Err(_) => {
            return Verification {
                manifest: None,
                faults: vec![Fault::ManifestMissing],
            }
        }
    };
    let manifest: Manifest = match serde_json::from_slice(&manifest_bytes) {
        Ok(m) => m,
        Err(e) => {
            return Verification {
                manifest: None,
                faults: vec![Fault::ManifestUnreadable(e.to_string())],
            }
        }
    };
    if manifest.format != FORMAT {
        faults.push(Fault::ManifestUnreadable(format!(
            "format {:?}, expected {FORMAT:?}",
            manifest.format
        )));
    }
    // The signature.
    let named = unhex(&manifest.signing_key).unwrap_or_default();
    match std::fs::read_to_string(dir.join(SIGNATURE)) {
        Err(_) => faults.push(Fault::SignatureMissing),
        Ok(sig) => {
            if let Some(t) = trusted.filter(|t| *t != named.as_slice()) {
                faults.push(Fault::UntrustedKey {
                    found: manifest.signing_key.clone(),
                    trusted: hex(t),
                });
            } else {
                let ok = unhex(sig.trim()).is_some_and(|sig| {
                    UnparsedPublicKey::new(&ED25519, &named)
                        .verify(&manifest_bytes, &sig)
                        .is_ok()
                });
                if !ok {
                    faults.push(Fault::SignatureInvalid);
                }
            }
        }
    }
    // The files.
    let listed: BTreeSet<&str> = manifest.files.iter().map(|f| f.path.as_str()).collect();
    for f in &manifest.files {
        let Some(rel) = relative(Path::new(&f.path)).filter(|r| *r == f.path) else {
            faults.push(Fault::ManifestUnreadable(format!(
                "file path {:?} leaves the folder",
                f.path
            )));
            continue;
        };
        match std::fs::read(dir.join(&rel)) {
            Err(_) => faults.push(Fault::FileMissing(rel)),
            Ok(bytes) => {
                let found = sha256_hex(&bytes);
                if found != f.sha256 || bytes.len() as u64 != f.bytes {
                    faults.push(Fault::FileChanged {
                        path: rel,
                        sealed: f.sha256.clone(),
                        found,
                    });
                }
            }
        }
    }
    match list_files(dir) {
        Ok(present) => {
            for p in present {
                if !listed.contains(p.as_str()) {
                    faults.push(Fault::FileAdded(p));
                }
            }
        }
        Err(e) => faults.push(Fault::ManifestUnreadable(format!(
            "cannot list the folder: {e}"
        ))),
    }
    // The audit log.
    match relative(Path::new(&manifest.audit.path)).map(|r| std::fs::read(dir.join(r))) {
        Some(Ok(bytes)) => {
            let chain = verify_chain(&bytes);
            let broken = !chain.faults.is_empty();
            faults.extend(chain.faults.into_iter().map(Fault::Audit));
            if !broken
                && (chain.entries != manifest.audit.entries
                    || chain.last_hash != manifest.audit.final_hash)
            {
                faults.push(Fault::AuditNotSealed {
                    entries: chain.entries,
                    hash: chain.last_hash,
                    sealed_entries: manifest.audit.entries,
                    sealed_hash: manifest.audit.final_hash.clone(),
                });
            }
        }
        // Already named as a missing file.
        Some(Err(_)) => {}
        None => faults.push(Fault::ManifestUnreadable(format!(
            "audit path {:?} leaves the folder",
            manifest.audit.path
        ))),
    }
    Verification {
        manifest: Some(manifest),
        faults,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sealed() -> (tempfile::TempDir, SigningKey) {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::load_or_create(&dir.path().join("node.key")).unwrap();
        let folder = dir.path().join("session");
        std::fs::create_dir_all(folder.join("snapshots")).unwrap();
        std::fs::write(folder.join("user.webm"), b"media bytes").unwrap();
        std::fs::write(folder.join("snapshots/1.png"), b"png").unwrap();
        let mut log = AuditLog::create(&folder.join("audit.jsonl")).unwrap();
        for e in ["session_created", "participant_joined", "session_ended"] {
            log.append(e, serde_json::Map::new()).unwrap();
        }
        seal(
            &folder,
            "kyc-1",
            SealStatus::Complete,
            &log,
            json!({"participants": []}),
            &key,
        )
        .unwrap();
        (dir, key)
    }

    #[test]
    fn a_sealed_folder_verifies_against_its_key() {
        let (dir, key) = sealed();
        let folder = dir.path().join("session");
        let v = verify(&folder, Some(&unhex(&key.public_hex()).unwrap()));
        assert_eq!(v.faults, vec![]);
        let m = v.manifest.unwrap();
        assert_eq!(m.files.len(), 3, "{:?}", m.files);
        assert_eq!(m.audit.entries, 3);
        assert!(matches!(
            seal(
                &folder,
                "kyc-1",
                SealStatus::Complete,
                &AuditLog::reopen(&folder.join("audit.jsonl")).unwrap().0,
                json!({}),
                &key
            ),
            Err(SealError::AlreadySealed(_))
        ));
        // The public key written beside the private one is accepted too.
        let pem = dir.path().join("node.pub.pem");
        assert_eq!(
            parse_public_key(pem.to_str().unwrap()).unwrap(),
            unhex(&key.public_hex()).unwrap()
        );
    }

    #[test]
    fn an_audit_log_extended_after_sealing_is_not_the_sealed_one() {
        let (dir, _key) = sealed();
        let folder = dir.path().join("session");
        let (mut log, _) = AuditLog::reopen(&folder.join("audit.jsonl")).unwrap();
        log.append("forged", serde_json::Map::new()).unwrap();
        let faults = verify(&folder, None).faults;
        assert!(
            faults
                .iter()
                .any(|f| matches!(f, Fault::AuditNotSealed { entries: 4, .. })),
            "{faults:?}"
        );
        assert!(
            faults
                .iter()
                .any(|f| matches!(f, Fault::FileChanged { path, .. } if path == "audit.jsonl")),
            "{faults:?}"
        );
    }

    #[test]
    fn a_manifest_naming_paths_outside_the_folder_is_refused() {
        assert_eq!(relative(Path::new("../etc/passwd")), None);
        assert_eq!(relative(Path::new("/etc/passwd")), None);
        assert_eq!(relative(Path::new("a/b.webm")).as_deref(), Some("a/b.webm"));
    }
}
