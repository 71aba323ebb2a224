//! Janus (Debian's `janus`, VideoRoom plugin, plain HTTP API) as the peer SFU of the benchmark,
//! driven by the same load generator as Meridian.
//!
//! Janus 1.1 never offers a loopback candidate, so it must run where an interface other than
//! `lo` carries a loopback-range address: `tests/bench-janus.sh` makes a private network
//! namespace with a veth holding 127.0.0.2/32 and runs the benchmark in it, and Janus is told
//! to gather only on that veth (`ice_enforce_list`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::BenchError;

/// A Janus process with a configuration of its own.
pub struct JanusProcess {
    child: std::process::Child,
    pub http: SocketAddr,
    pub log: PathBuf,
    /// Address the load generator's peers bind: Janus pairs its veth candidate only with
    /// candidates outside `lo`, so they use the veth's address too.
    pub client_ip: std::net::IpAddr,
}

impl JanusProcess {
    /// Starts `janus` with only the VideoRoom plugin and the HTTP transport, gathering ICE
    /// candidates only on `interface`.
    pub fn start(
        dir: &Path,
        interface: &str,
        client_ip: std::net::IpAddr,
    ) -> std::io::Result<JanusProcess> {
        std::fs::create_dir_all(dir)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let lib = "/usr/lib/x86_64-linux-gnu/janus";
        std::fs::write(
            dir.join("janus.jcfg"),
            format!(
                r#"general: {{
    configs_folder = "{dir}"
    plugins_folder = "{lib}/plugins"
    transports_folder = "{lib}/transports"
    events_folder = "{lib}/events"
    loggers_folder = "{lib}/loggers"
    debug_level = 3
    session_timeout = 120
}}
media: {{
}}
nat: {{
    nice_debug = false
    ice_enforce_list = "{interface}"
}}
plugins: {{
    disable = "libjanus_audiobridge.so,libjanus_echotest.so,libjanus_recordplay.so,libjanus_sip.so,libjanus_nosip.so,libjanus_streaming.so,libjanus_textroom.so,libjanus_videocall.so,libjanus_voicemail.so,libjanus_duktape.so,libjanus_lua.so"
}}
transports: {{
    disable = "libjanus_websockets.so,libjanus_pfunix.so,libjanus_mqtt.so,libjanus_nanomsg.so,libjanus_rabbitmq.so"
}}
events: {{
    broadcast = false
}}
"#,
                dir = dir.display()
            ),
        )?;
        std::fs::write(
            dir.join("janus.transport.http.jcfg"),
            format!(
                "general: {{\n    base_path = \"/janus\"\n    http = true\n    port = {port}\n    ip = \"127.0.0.1\"\n    https = false\n}}\nadmin: {{\n    admin_http = false\n}}\n"
            ),
        )?;
        std::fs::write(dir.join("janus.plugin.videoroom.jcfg"), "general: {\n}\n")?;
        let log = dir.join("janus.log");
        let child = std::process::Command::new("janus")
            .arg("-F")
            .arg(dir)
            .arg("-C")
            .arg(dir.join("janus.jcfg"))
            .arg("-N")
            .arg("-L")
            .arg(&log)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        Ok(JanusProcess {
            child,
            http: ([127, 0, 0, 1], port).into(),
            log,
            client_ip,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until Janus answers on its HTTP port.
    pub async fn wait_ready(&self) -> Result<(), BenchError> {
        let started = std::time::Instant::now();
        while tokio::net::TcpStream::connect(self.http).await.is_err() {
            if started.elapsed() > Duration::from_secs(10) {
                return Err(BenchError::Sfu(format!(
                    "janus did not start; see {}",
                    self.log.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }
}

impl Drop for JanusProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Value, BenchError> {
    let err = |e: std::io::Error| BenchError::Sfu(format!("janus http: {e}"));
    let mut s = tokio::net::TcpStream::connect(addr).await.map_err(err)?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.map_err(err)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await.map_err(err)?;
    let text = String::from_utf8_lossy(&resp);
    let json = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    // Janus may answer with a chunked body; the JSON is the part between the first `{`/`[`
    // and the last `}`/`]`.
    let start = json.find(['{', '[']).unwrap_or(0);
    let end = json.rfind(['}', ']']).map(|i| i + 1).unwrap_or(json.len());
    serde_json::from_str(&json[start..end])
        .map_err(|e| BenchError::Sfu(format!("janus answered {json:?}: {e}")))
}

/// One Janus API session with its event long-poll.
pub struct JanusClient {
    addr: SocketAddr,
    session: u64,
    routes: Arc<Mutex<std::collections::HashMap<u64, mpsc::UnboundedSender<Value>>>>,
    poller: tokio::task::JoinHandle<()>,
}

fn tx() -> String {
    format!("{:016x}", rand::random::<u64>())
}

impl JanusClient {
    pub async fn connect(addr: SocketAddr) -> Result<JanusClient, BenchError> {
        let r = http(
            addr,
            "POST",
            "/janus",
            Some(&json!({"janus":"create","transaction":tx()})),
        )
        .await?;
        let session = r["data"]["id"]
            .as_u64()
            .ok_or_else(|| BenchError::Sfu(format!("janus create: {r}")))?;
        let routes: Arc<Mutex<std::collections::HashMap<u64, mpsc::UnboundedSender<Value>>>> =
            Default::default();
        let poll_routes = routes.clone();
        let poller = tokio::spawn(async move {
            loop {
                let Ok(v) = http(addr, "GET", &format!("/janus/{session}?maxev=10"), None).await
                else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let events = match v {
                    Value::Array(a) => a,
                    other => vec![other],
                };
                for ev in events {
                    if let Some(sender) = ev["sender"].as_u64() {
                        if let Some(tx) = poll_routes
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get(&sender)
                        {
                            let _ = tx.send(ev);
                        }
                    }
                }
            }
        });
        Ok(JanusClient {
            addr,
            session,
            routes,
            poller,
        })
    }

    /// Attaches a VideoRoom handle; returns it with its event stream.
    pub async fn attach(&self) -> Result<(u64, mpsc::UnboundedReceiver<Value>), BenchError> {
        let r = http(
            self.addr,
            "POST",
            &format!("/janus/{}", self.session),
            Some(&json!({"janus":"attach","plugin":"janus.plugin.videoroom","transaction":tx()})),
        )
        .await?;
        let handle = r["data"]["id"]
            .as_u64()
            .ok_or_else(|| BenchError::Sfu(format!("janus attach: {r}")))?;
        let (etx, erx) = mpsc::unbounded_channel();
        self.routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(handle, etx);
        Ok((handle, erx))
    }

    /// Sends a plugin message (with an optional JSEP) and returns the immediate answer.
    pub async fn message(
        &self,
        handle: u64,
        body: Value,
        jsep: Option<Value>,
    ) -> Result<Value, BenchError> {
        let mut m = json!({"janus":"message","body":body,"transaction":tx()});
        if let Some(j) = jsep {
            m["jsep"] = j;
        }
        http(
            self.addr,
            "POST",
            &format!("/janus/{}/{handle}", self.session),
            Some(&m),
        )
        .await
    }
}

impl JanusClient {
    /// Tells Janus that all of our candidates were in the SDP (it waits for this otherwise).
    pub async fn trickle_done(&self, handle: u64) -> Result<(), BenchError> {
        http(
            self.addr,
            "POST",
            &format!("/janus/{}/{handle}", self.session),
            Some(&json!({"janus":"trickle","candidate":{"completed":true},"transaction":tx()})),
        )
        .await
        .map(|_| ())
    }
}

impl Drop for JanusClient {
    fn drop(&mut self) {
        self.poller.abort();
    }
}

/// The next event on a handle carrying a JSEP, within 10 s.
pub async fn jsep_event(events: &mut mpsc::UnboundedReceiver<Value>) -> Result<Value, BenchError> {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .map_err(|_| BenchError::Sfu("no answer from janus within 10 s".into()))?
            .ok_or_else(|| BenchError::Sfu("janus session ended".into()))?;
        if ev["plugindata"]["data"]["error"].is_string() {
            return Err(BenchError::Sfu(format!(
                "janus: {}",
                ev["plugindata"]["data"]
            )));
        }
        if ev["jsep"]["sdp"].is_string() {
            return Ok(ev);
        }
    }
}
