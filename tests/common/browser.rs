//! Headless Chromium for tests: started directly (not through Debian's wrapper), with a fresh
//! profile, fake camera and microphone, and no way to reach anything but loopback.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const CHROMIUM: &str = "/usr/lib/chromium/chromium";
pub const FIREFOX: &str = "/usr/bin/firefox-esr";

/// Firefox preferences: fake devices granted without prompts, loopback ICE candidates, page
/// console on stdout, and every non-loopback request sent to a dead local proxy.
const FIREFOX_PREFS: &str = r#"
user_pref("media.navigator.streams.fake", true);
user_pref("media.navigator.permission.disabled", true);
user_pref("permissions.default.camera", 1);
user_pref("permissions.default.microphone", 1);
user_pref("media.peerconnection.ice.loopback", true);
user_pref("media.autoplay.default", 0);
user_pref("devtools.console.stdout.content", true);
user_pref("network.proxy.type", 1);
user_pref("network.proxy.http", "127.0.0.1");
user_pref("network.proxy.http_port", 9);
user_pref("network.proxy.ssl", "127.0.0.1");
user_pref("network.proxy.ssl_port", 9);
user_pref("network.proxy.no_proxies_on", "127.0.0.1, localhost");
user_pref("toolkit.telemetry.enabled", false);
user_pref("datareporting.policy.dataSubmissionEnabled", false);
user_pref("app.update.enabled", false);
user_pref("browser.shell.checkDefaultBrowser", false);
"#;

/// Panics unless the test runs where a browser can reach nothing beyond loopback: a private
/// network namespace whose main routing table is empty (tests/run.sh sets that up).
pub fn assert_isolated_network() {
    let routes = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    let entries = routes
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .count();
    assert_eq!(
        entries, 0,
        "browser tests must run in a network namespace with only loopback; run tests/run.sh"
    );
    assert!(
        std::path::Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: tests/run.sh installs Debian's chromium package"
    );
}

/// One browser process showing one page; collects the page's `MERIDIAN_*` console lines.
pub struct Browser {
    child: Child,
    lines: Arc<Mutex<Vec<(String, Value)>>>,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub fn open(url: &str) -> Browser {
        Self::open_with(url, &[])
    }

    /// The page in Chromium started with extra command-line flags.
    pub fn open_with(url: &str, extra: &[String]) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let tmp: PathBuf = profile.path().join("tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        let child = Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                "--allow-loopback-in-peer-connection",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--autoplay-policy=no-user-gesture-required",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.*",
                "--enable-logging=stderr",
                "--v=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg(url)
            .env("TMPDIR", &tmp)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chromium");
        Self::collect(child, profile)
    }

    /// The page in headless Firefox ESR.
    pub fn firefox(url: &str) -> Browser {
        Self::firefox_with(url, &[], "")
    }

    /// The page in a phone's window (390 × 844). Both headless browsers widen a window to at
    /// least 500 pixels, so the page sees a 500-pixel viewport: still a phone's layout, which
    /// the pages use below 800.
    pub fn phone(url: &str, firefox: bool) -> Browser {
        if firefox {
            Self::firefox_with(
                url,
                &[
                    ("MOZ_HEADLESS_WIDTH", "390"),
                    ("MOZ_HEADLESS_HEIGHT", "844"),
                ],
                "",
            )
        } else {
            Self::open_with(url, &["--window-size=390,844".to_string()])
        }
    }

    /// The page in a desktop-sized window (1280 × 800), as an agent's console is used.
    pub fn desktop(url: &str) -> Browser {
        Self::open_with(url, &["--window-size=1280,800".to_string()])
    }

    /// The page in headless Firefox ESR, with extra environment variables and preferences.
    pub fn firefox_with(url: &str, env: &[(&str, &str)], prefs: &str) -> Browser {
        assert!(
            std::path::Path::new(FIREFOX).exists(),
            "{FIREFOX} is missing: tests/run.sh installs Debian's firefox-esr package"
        );
        let profile = tempfile::tempdir().unwrap();
        std::fs::write(
            profile.path().join("user.js"),
            format!("{FIREFOX_PREFS}{prefs}"),
        )
        .unwrap();
        let child = Command::new(FIREFOX)
            .args(["--headless", "--no-remote", "--profile"])
            .arg(profile.path())
            .arg(url)
            .envs(env.iter().copied())
            .env("TMPDIR", profile.path())
            .env("HOME", profile.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start firefox");
        Self::collect(child, profile)
    }

    fn collect(mut child: Child, profile: tempfile::TempDir) -> Browser {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let outputs: Vec<Box<dyn std::io::Read + Send>> = [
            child
                .stdout
                .take()
                .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|e| Box::new(e) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        .collect();
        for out in outputs {
            let sink = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if let Some(parsed) = parse_console(&line) {
                        sink.lock().unwrap().push(parsed);
                    }
                }
            });
        }
        Browser {
            child,
            lines,
            _profile: profile,
        }
    }

    /// Console reports of one kind (`STATS`, `LIFTED`, ...), oldest first.
    pub fn reports(&self, kind: &str) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k == kind)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// All lines, for failure messages.
    pub fn transcript(&self) -> String {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A page's `MERIDIAN_<KIND> <json>` console line, as Chromium prints it
/// (`...CONSOLE(12)] "MERIDIAN_STATS {...}", source: http://... (12)`) or as Firefox does
/// (`console.log: "MERIDIAN_STATS {\"a\":1}"`, a JSON string) → ("STATS", {...}).
pub fn parse_console(line: &str) -> Option<(String, Value)> {
    let body: String = if let Some(rest) = line.strip_prefix("console.log: ") {
        serde_json::from_str(rest).ok()?
    } else {
        let start = line.find("\"MERIDIAN_")? + 1;
        let rest = &line[start..];
        rest[..rest.rfind("\", source:")?].to_owned()
    };
    let body = body.strip_prefix("MERIDIAN_")?;
    let (kind, json) = body.split_once(' ')?;
    Some((kind.to_owned(), serde_json::from_str(json).ok()?))
}

/// The largest value of `field` among video consumers in a STATS report.
fn video_max(report: &Value, field: &str) -> u64 {
    report["consumers"]
        .as_object()
        .and_then(|m| {
            m.values()
                .filter(|c| c["kind"] == "video")
                .filter_map(|c| c[field].as_u64())
                .max()
        })
        .unwrap_or(0)
}

/// Frames decoded by the video consumer(s) in a STATS report.
pub fn video_frames(report: &Value) -> u64 {
    video_max(report, "framesDecoded")
}

/// Width of the decoded video in a STATS report.
pub fn video_width(report: &Value) -> u64 {
    video_max(report, "frameWidth")
}

/// The page has decoded at least 30 frames and is still decoding (rising between its last
/// two reports).
pub fn decoding(b: &Browser) -> bool {
    let r = b.reports("STATS");
    r.len() >= 2
        && video_frames(&r[r.len() - 1]) > video_frames(&r[r.len() - 2])
        && video_frames(&r[r.len() - 1]) >= 30
}

/// Waits until `cond` holds, failing with the browsers' transcripts after `within`.
pub async fn wait_until(
    what: &str,
    within: Duration,
    browsers: &[&Browser],
    mut cond: impl FnMut() -> bool,
) {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > within {
            let t: Vec<String> = browsers.iter().map(|b| b.transcript()).collect();
            panic!(
                "timed out waiting for {what}; browser reports:\n{}",
                t.join("\n---\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
