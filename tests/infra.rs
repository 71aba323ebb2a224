//! The deployment files in infra/ checked by the tools that will read them: systemd accepts
//! the unit (`systemd-analyze verify`), every sysctl the drop-in sets exists in this kernel,
//! the bootstrap script is valid bash (and clean under shellcheck), and the layered
//! configuration the unit starts the node with loads (`meridian check`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn systemd_accepts_the_unit() {
    if !have("systemd-analyze") {
        eprintln!("systemd-analyze is not available here: the unit was not verified");
        return;
    }
    // The unit as installed, but starting this build's binary (verify checks that the
    // command exists and is executable).
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(repo().join("infra/systemd/meridian.service"))
        .unwrap()
        .replace("/usr/local/bin/meridian", env!("CARGO_BIN_EXE_meridian"));
    let path = dir.path().join("meridian.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .env("SYSTEMD_LOG_LEVEL", "warning")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Lines about the host (no running systemd in a container, other units) are not ours.
    let ours: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("meridian.service"))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify: {err}"
    );
}

/// Sysctls global to the host, which a network namespace (the tests run in one) does not
/// show under /proc/sys.
const HOST_GLOBAL: &[&str] = &["net.core.netdev_max_backlog", "net.core.netdev_budget"];

#[test]
fn every_sysctl_the_drop_in_sets_exists() {
    let text = std::fs::read_to_string(repo().join("infra/systemd/90-meridian-udp.conf")).unwrap();
    let mut keys = 0;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not `key = value`: {line}"));
        let key = key.trim();
        assert!(!value.trim().is_empty(), "{line}");
        let proc = Path::new("/proc/sys").join(key.replace('.', "/"));
        assert!(
            proc.exists() || HOST_GLOBAL.contains(&key),
            "{key} is not a sysctl of this kernel"
        );
        keys += 1;
    }
    assert!(keys >= 5);
}

#[test]
fn the_bootstrap_script_is_valid_bash_and_clean_under_shellcheck() {
    let script = repo().join("infra/bootstrap/install-meridian.sh");
    let out = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bash -n: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Called wrongly, it says how to call it and changes nothing.
    let out = Command::new("bash").arg(&script).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage:"));
    if !have("shellcheck") {
        eprintln!("shellcheck is not installed here: tests/run.sh installs it");
        return;
    }
    for file in [
        script,
        repo().join("tests/run.sh"),
        repo().join("infra/lab/mesh-lab.sh"),
    ] {
        if !file.exists() {
            continue;
        }
        let out = Command::new("shellcheck").arg(&file).output().unwrap();
        assert!(
            out.status.success(),
            "shellcheck {}:\n{}",
            file.display(),
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// `meridian check` on India's region file with `node` over it: (success, stdout, stderr).
fn check_over_india(node: &Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["check", "--config"])
        .arg(repo().join("regions/india.toml"))
        .arg("--config")
        .arg(node)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn meridian_check_loads_a_layered_configuration_and_names_the_fault_in_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let node = dir.path().join("node.toml");
    std::fs::write(
        &node,
        "[node]\nid = \"india-7\"\n[rtc]\nlisten_ip = \"0.0.0.0\"\nannounced_ip = \"198.51.100.7\"\nworkers = 4\n",
    )
    .unwrap();
    let (ok, said, err) = check_over_india(&node);
    assert!(ok, "{err}");
    // The node file's id and workers over the region file's ports.
    assert!(
        said.contains("india-7 (region india)") && said.contains("media 4 port(s) from 40100"),
        "{said}"
    );
    std::fs::write(&node, "[rtc]\nworkerz = 4\n").unwrap();
    let (ok, _, err) = check_over_india(&node);
    assert!(!ok);
    assert!(err.contains("workerz"), "{err}");
}
