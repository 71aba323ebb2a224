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
    /// Chromium's DevTools WebSocket, when started with `--remote-debugging-port`.
    devtools: Arc<Mutex<Option<String>>>,
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
        let devtools = Arc::new(Mutex::new(None));
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
            let devtools = devtools.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if let Some(url) = line.strip_prefix("DevTools listening on ") {
                        *devtools.lock().unwrap() = Some(url.trim().to_owned());
                    }
                    if let Some(parsed) = parse_console(&line) {
                        sink.lock().unwrap().push(parsed);
                    }
                }
            });
        }
        Browser {
            child,
            lines,
            devtools,
            _profile: profile,
        }
    }

    /// The page in Chromium with the DevTools protocol on, for tests that click and grant
    /// permissions as a person would (see [`Cdp`]).
    pub fn debuggable(url: &str, extra: &[String]) -> Browser {
        let mut args = vec!["--remote-debugging-port=0".to_string()];
        args.extend_from_slice(extra);
        Self::open_with(url, &args)
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

/// A DevTools protocol session with a [`Browser::debuggable`] page: the browser-level
/// connection, attached to its page target. Overrides set through it last while it is open.
pub struct Cdp {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next: u64,
    page: String,
}

impl Cdp {
    pub async fn attach(b: &Browser) -> Cdp {
        let start = Instant::now();
        let url = loop {
            if let Some(u) = b.devtools.lock().unwrap().clone() {
                break u;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "Chromium printed no DevTools address"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .expect("connect to DevTools");
        let mut cdp = Cdp {
            ws,
            next: 0,
            page: String::new(),
        };
        let target = loop {
            let targets = cdp
                .call_on(None, "Target.getTargets", serde_json::json!({}))
                .await;
            let page = targets["targetInfos"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|t| t["type"] == "page")
                .map(|t| t["targetId"].as_str().unwrap().to_owned());
            if let Some(p) = page {
                break p;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "no page target");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let attached = cdp
            .call_on(
                None,
                "Target.attachToTarget",
                serde_json::json!({"targetId": target, "flatten": true}),
            )
            .await;
        cdp.page = attached["sessionId"].as_str().unwrap().to_owned();
        cdp
    }

    async fn call_on(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        self.next += 1;
        let id = self.next;
        let mut msg = serde_json::json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = s.into();
        }
        self.ws
            .send(Message::Text(msg.to_string().into()))
            .await
            .expect("DevTools send");
        loop {
            let m = tokio::time::timeout(Duration::from_secs(30), self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("DevTools did not answer {method}"))
                .expect("DevTools open")
                .expect("DevTools read");
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["id"] == id {
                assert!(v["error"].is_null(), "{method}: {}", v["error"]);
                return v["result"].clone();
            }
        }
    }

    /// A method of the page (`Emulation.*`, `Runtime.*`).
    pub async fn page(&mut self, method: &str, params: Value) -> Value {
        let page = self.page.clone();
        self.call_on(Some(&page), method, params).await
    }

    /// A method of the browser (`Browser.*`).
    pub async fn browser(&mut self, method: &str, params: Value) -> Value {
        self.call_on(None, method, params).await
    }

    /// Grants geolocation and makes the page's position `(latitude, longitude)`. (The grant
    /// replaces every other, so the camera and microphone are granted again with it: without
    /// them Chromium gathers no loopback candidates.)
    pub async fn place(&mut self, latitude: f64, longitude: f64, accuracy: f64) {
        self.browser(
            "Browser.grantPermissions",
            serde_json::json!({"permissions": ["geolocation", "audioCapture", "videoCapture"]}),
        )
        .await;
        self.page(
            "Emulation.setGeolocationOverride",
            serde_json::json!({"latitude": latitude, "longitude": longitude, "accuracy": accuracy}),
        )
        .await;
    }

    /// Clicks the page's element `#id` as a person would (a trusted click event).
    pub async fn click(&mut self, id: &str) {
        let r = self
            .page(
                "Runtime.evaluate",
                serde_json::json!({
                    "expression": format!("(() => {{ const b = document.getElementById({id:?}); if (!b) return false; b.click(); return true; }})()"),
                    "userGesture": true,
                    "returnByValue": true,
                }),
            )
            .await;
        assert_eq!(r["result"]["value"], true, "no #{id} to click");
    }
}

/// The call the failover and drain tests start from: a user page in Mumbai (its browser
/// behind a SOCKS proxy leaving from `mumbai`, a 127.1/16 address) routed by `router`'s
/// `/v1/edge`, and an agent page joined to `agent_node` directly; both decoding each other.
pub async fn mumbai_user_and_agent(
    router: &meridian::node::Node,
    agent_node: &meridian::node::Node,
    session: &str,
    mumbai: std::net::IpAddr,
) -> (super::socks::SocksProxy, Browser, Browser) {
    let proxy = super::socks::SocksProxy::start(mumbai).await;
    let day = Duration::from_secs(3600);
    let user = Browser::open_with(
        &format!(
            "{}/demo/user.html#token={}&route=1",
            router.http_url(),
            super::token(session, "alice", meridian::auth::Role::User, day)
        ),
        &[
            format!("--proxy-server=socks5://{}", proxy.addr),
            // Chromium never proxies loopback unless told to.
            "--proxy-bypass-list=<-loopback>".into(),
        ],
    );
    let agent = Browser::open(&format!(
        "{}/demo/agent.html#token={}",
        agent_node.http_url(),
        super::token(session, "bob", meridian::auth::Role::Agent, day)
    ));
    both_decoding(
        "the user and the agent decoding each other",
        90,
        &user,
        &agent,
    )
    .await;
    (proxy, user, agent)
}

/// The page never showed another participant leaving.
pub fn saw_no_leave(b: &Browser) -> bool {
    b.reports("PRESENCE").iter().all(|r| r["event"] != "left")
}

/// Waits up to `secs` until `user` and `agent` both decode video (their transcripts shown if
/// not).
pub async fn both_decoding(what: &str, secs: u64, user: &Browser, agent: &Browser) {
    wait_until(what, Duration::from_secs(secs), &[user, agent], || {
        decoding(user) && decoding(agent)
    })
    .await;
}
