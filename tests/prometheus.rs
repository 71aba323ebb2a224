//! Monitoring through the real tools: Debian's Prometheus scrapes a recording mesh carrying a
//! cross-region call and evaluates infra/'s recording rules on it; every metric name that the
//! Grafana dashboard and the rules use is one Prometheus ingested from the nodes; promtool
//! checks the configuration and unit-tests the alerts (node down, pipe loss, region over
//! capacity, recording failing).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use meridian::auth::Role;
use serde_json::Value;

fn infra(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("infra")
        .join(file)
}

fn tool(name: &str) -> PathBuf {
    let path = Path::new("/usr/bin").join(name);
    assert!(
        path.exists(),
        "{name} is missing: install Debian's prometheus package (tests/run.sh does)"
    );
    path
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn promtool_accepts_the_configuration_and_the_alert_rules_pass_their_unit_tests() {
    let promtool = tool("promtool");
    run(Command::new(&promtool)
        .arg("check")
        .arg("config")
        .arg(infra("prometheus/prometheus.yml")));
    let checked = run(Command::new(&promtool)
        .arg("check")
        .arg("rules")
        .arg(infra("prometheus/meridian.rules.yml")));
    assert!(checked.contains("SUCCESS"), "{checked}");
    // Run from the rules' folder: the test file names the rules file relative to it.
    let tested = run(Command::new(&promtool)
        .current_dir(infra("prometheus"))
        .args(["test", "rules", "meridian.rules.test.yml"]));
    assert!(tested.contains("SUCCESS"), "{tested}");
    let tests = std::fs::read_to_string(infra("prometheus/meridian.rules.test.yml")).unwrap();
    for alert in ["MeridianNodeDown", "MeridianPipeLossHigh"] {
        assert!(
            tests.contains(&format!("alertname: {alert}")),
            "{alert} has a unit test"
        );
    }
}

/// Every `meridian_…` metric name (and Prometheus's own `up`) in `text`, and every
/// `meridian:…` recording-rule name.
fn names_in(text: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut metrics, mut recorded) = (BTreeSet::new(), BTreeSet::new());
    let bytes = text.as_bytes();
    let word = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b':';
    let mut i = 0;
    while let Some(at) = text[i..].find("meridian").map(|k| k + i) {
        let mut end = at;
        while end < bytes.len() && word(bytes[end]) {
            end += 1;
        }
        let name = &text[at..end];
        let before_ok = at == 0 || !word(bytes[at - 1]);
        if before_ok && name.starts_with("meridian_") {
            metrics.insert(name.to_owned());
        } else if before_ok && name.starts_with("meridian:") {
            recorded.insert(name.to_owned());
        }
        i = end.max(at + 1);
    }
    if text.contains("up{job=") {
        metrics.insert("up".into());
    }
    (metrics, recorded)
}

/// The expressions of the Grafana dashboard, joined.
fn dashboard_exprs() -> String {
    let text = std::fs::read_to_string(infra("grafana/meridian-mesh.json")).unwrap();
    let dash: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut out = String::new();
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            out.push_str(t["expr"].as_str().unwrap());
            out.push('\n');
        }
    }
    assert!(out.len() > 1000, "the dashboard has its panels");
    out
}

struct Prometheus {
    child: Child,
    addr: std::net::SocketAddr,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_prometheus(dir: &Path, targets: &[std::net::SocketAddr]) -> Prometheus {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let targets: Vec<String> = targets.iter().map(|a| format!("\"{a}\"")).collect();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {}\n\
         scrape_configs:\n  - job_name: meridian\n    static_configs:\n      - targets: [{}]\n",
        infra("prometheus/meridian.rules.yml").display(),
        targets.join(", ")
    );
    let cfg = dir.join("prometheus.yml");
    std::fs::write(&cfg, config).unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = Command::new(tool("prometheus"))
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Prometheus { child, addr }
}

/// A Prometheus API answer; `Null` while the server is not listening yet.
async fn api(p: &Prometheus, path_and_query: &str) -> Value {
    if tokio::net::TcpStream::connect(p.addr).await.is_err() {
        return Value::Null;
    }
    let body = http_get_at(p.addr, path_and_query).await;
    serde_json::from_str(&body).unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_a_mesh_in_a_call_and_the_dashboard_and_rules_use_only_exported_names() {
    let dir = tempfile::tempdir().unwrap();
    // Recording on, so the recorder's figures are exported too.
    let nodes = recording_mesh(dir.path()).await;
    let india = nodes.iter().find(|n| n.region.as_str() == "india").unwrap();
    let us = nodes.iter().find(|n| n.region.as_str() == "us").unwrap();

    // A cross-region call: the user publishes in India, the agent watches from the US.
    let (mut user, _) = Signal::join(india, "kyc-prom", "u-1", Role::User).await;
    let (mut agent, _) = Signal::join(us, "kyc-prom", "a-1", Role::Agent).await;
    let (producer, _publisher, _p) = publish_as(&mut user, TestCodec::Vp8).await;
    // Known on the US node once the mesh has announced it.
    agent.event("producerAdded").await;
    let (seen, _s) =
        subscribe_as(&mut agent, &producer, TestCodec::Vp8, PeerState::default()).await;
    wait_for("media at the agent", Duration::from_secs(15), || {
        seen.received.lock().unwrap().len() >= 50
    })
    .await;
    // The summaries the SDK sends; a second one too soon is refused, and so is nonsense.
    let summary = r#"{"type":"stats","rttMs":120,"jitterMs":8,"loss":0.01,"framesDecoded":150,"freezes":1,"frameHeight":720,"firstFrameMs":400}"#;
    agent.send_text(summary).await;
    user.send_text(summary).await;
    agent.send_text(summary).await;
    let refused = agent.event("error").await;
    assert_eq!(refused["code"], "stats_too_frequent", "{refused}");
    user.send_text(r#"{"type":"stats","loss":3}"#).await;
    assert_eq!(user.event("error").await["code"], "bad_stats");

    let scrape = metrics(us).await;
    assert!(scrape.ends_with("# EOF\n"), "OpenMetrics text");
    assert!(
        scrape.contains(
            "meridian_client_reports_total{region=\"us\",node=\"us-1\",role=\"agent\"} 1"
        ),
        "the agent's summary counted once:\n{scrape}"
    );
    assert!(
        scrape.contains("meridian_signaling_errors_total{region=\"us\",node=\"us-1\",code=\"stats_too_frequent\"} 1"),
        "{scrape}"
    );

    let scraped: Vec<_> = nodes.iter().map(|n| n.metrics_addr).collect();
    let prom = start_prometheus(dir.path(), &scraped);
    let mut up = Value::Null;
    for _ in 0..150 {
        up = api(&prom, "/api/v1/query?query=up%7Bjob%3D%22meridian%22%7D").await;
        let results = up["data"]["result"].as_array().cloned().unwrap_or_default();
        if results.len() == nodes.len() && results.iter().all(|r| r["value"][1] == "1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let results = up["data"]["result"].as_array().cloned().unwrap_or_default();
    assert!(
        results.len() == nodes.len() && results.iter().all(|r| r["value"][1] == "1"),
        "Prometheus scrapes every node: {up}\nlog: {}",
        std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
    );

    let rules = std::fs::read_to_string(infra("prometheus/meridian.rules.yml")).unwrap();
    let (rule_metrics, rule_records) = names_in(&rules);
    let (dash_metrics, dash_records) = names_in(&dashboard_exprs());
    let wanted: BTreeSet<String> = rule_metrics.union(&dash_metrics).cloned().collect();
    assert!(wanted.len() > 30, "{wanted:?}");
    for r in &dash_records {
        assert!(
            rules.contains(&format!("record: {r}")),
            "the dashboard's {r} is a recording rule"
        );
    }
    // Recording rules evaluated on the live figures land too (their group runs every 15 s).
    let also = ["meridian:region_load:avg", "meridian:member_load:max"];
    let mut missing: Vec<String> = Vec::new();
    for _ in 0..100 {
        let names = api(&prom, "/api/v1/label/__name__/values").await;
        let have: BTreeSet<String> = names["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect();
        missing = wanted
            .iter()
            .map(String::as_str)
            .chain(also)
            .filter(|n| !have.contains(*n))
            .map(str::to_owned)
            .collect();
        if missing.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        missing.is_empty(),
        "names the dashboard or rules use that Prometheus never ingested: {missing:?}"
    );
    assert!(rule_records.contains("meridian:pipe_loss:ratio5m"));
}
