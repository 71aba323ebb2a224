//! `meridian ctl`: the operators' command line. It talks to one node's admin API and through
//! it to the whole mesh (see [`crate::admin`]): tables for people, `--json` for scripts, and
//! for the long operations (a drain, a rebalance) a progress bar until the nodes are empty or
//! the deadline has passed, then who moved and who did not.
//!
//! Exit status: 0 done; 1 the call failed; 2 a node could not be reached or refused; 3 the
//! operation ended with participants or sessions left behind.

use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use clap::Subcommand;
use reqwest::Method;

use crate::admin::{call, read_token, session_table, table, SessionStatus, Status};
use crate::ids::{NodeId, RegionId, SessionId};

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Every node of the mesh (state, load, sessions, weight, capacity) and every pipe (RTT,
    /// loss, bytes, bitrate), each node asked through the one ctl talks to.
    Status {
        /// JSON for scripts instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Stop a node (the one ctl talks to unless named), or every node of a region, taking new
    /// sessions (routing skips it); sessions there carry on unless --deadline moves them.
    Drain {
        /// The node to drain.
        node: Option<NodeId>,
        /// Drain every node of this region instead.
        #[arg(long, conflicts_with = "node")]
        region: Option<RegionId>,
        /// Move the participants to other edges within this time (`30s`, `2m`, or seconds):
        /// each is told where to go (the edge routing chooses for it), those still there at
        /// the deadline are closed. Waits and reports who moved and who did not.
        #[arg(long, value_parser = parse_duration_secs)]
        deadline: Option<u64>,
        /// Without --deadline: wait up to this many seconds for the nodes to empty, showing
        /// progress, then say what is left (exit status 3 if not empty).
        #[arg(long)]
        wait: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Let a node (or every node of a region) take new sessions again; participants told to
    /// move and not yet gone stay.
    Undrain {
        node: Option<NodeId>,
        #[arg(long, conflicts_with = "node")]
        region: Option<RegionId>,
        #[arg(long)]
        json: bool,
    },
    /// A region's routing weight: its distance from a client is divided by it (1 neutral,
    /// 0.5 halves its pull, 2 doubles it). Every node of the region announces it.
    Weight {
        region: RegionId,
        weight: f32,
        #[arg(long)]
        json: bool,
    },
    /// A region's capacity: the sessions at which each of its nodes counts as full and
    /// routing stops sending it new ones.
    Capacity {
        region: RegionId,
        /// Sessions per node.
        #[arg(long)]
        sessions: u32,
        #[arg(long)]
        json: bool,
    },
    /// Move whole sessions off a region's nodes (or one node's) until each is at most at
    /// --below of its capacity; off a drained node, all of them. Each participant is told to
    /// move to the next nearest healthy edge; one that does not stays.
    Rebalance {
        region: Option<RegionId>,
        #[arg(long, conflicts_with = "region")]
        node: Option<NodeId>,
        /// Target load factor (0..1].
        #[arg(long, default_value_t = crate::admin::DEFAULT_REBALANCE_BELOW)]
        below: f32,
        /// How long participants have to move.
        #[arg(long, value_parser = parse_duration_secs, default_value = "30")]
        deadline: u64,
        /// Wait until the participants told to move have gone (or the deadline passed).
        #[arg(long)]
        wait: bool,
        #[arg(long)]
        json: bool,
    },
    /// Where each participant, producer, consumer, pipe and recording of a session lives.
    Session {
        id: SessionId,
        #[arg(long)]
        json: bool,
    },
}

/// Why ctl stops with a status other than 0 after a call that worked.
#[derive(Debug, thiserror::Error)]
pub enum CtlOutcome {
    #[error("{0}")]
    NodesFailed(String),
    #[error("{0}")]
    LeftBehind(String),
}

impl CtlOutcome {
    pub fn exit_code(&self) -> i32 {
        match self {
            CtlOutcome::NodesFailed(_) => 2,
            CtlOutcome::LeftBehind(_) => 3,
        }
    }
}

/// Runs one ctl command against the admin API at `admin`.
pub async fn run(admin: &str, token_file: &Path, command: CtlCommand) -> anyhow::Result<()> {
    let token = read_token(token_file)?;
    let c = Client {
        admin,
        token: &token,
    };
    match command {
        CtlCommand::Status { json } => {
            let s = c.status().await?;
            print(&s, json);
            failed(&s)?;
        }
        CtlCommand::Undrain { node, region, json } => {
            c.act("/v1/admin/undrain", &target(&node, &region), &[], json)
                .await?;
        }
        CtlCommand::Weight {
            region,
            weight,
            json,
        } => {
            let extra = [("weight", weight.to_string())];
            c.act("/v1/admin/weight", &Target::Region(region), &extra, json)
                .await?;
        }
        CtlCommand::Capacity {
            region,
            sessions,
            json,
        } => {
            let extra = [("max_sessions", sessions.to_string())];
            c.act("/v1/admin/capacity", &Target::Region(region), &extra, json)
                .await?;
        }
        CtlCommand::Session { id, json } => {
            let s: SessionStatus = call(
                admin,
                &token,
                Method::GET,
                &format!("/v1/admin/session?id={id}"),
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
            } else {
                print!("{}", session_table(&s));
            }
        }
        CtlCommand::Drain {
            node,
            region,
            deadline: Some(secs),
            json,
            ..
        } => {
            let t = target(&node, &region);
            let before = c.status().await?;
            let nodes = t.nodes(&before);
            let s = c
                .post(
                    "/v1/admin/drain",
                    &t,
                    &[("deadline_secs", secs.to_string())],
                )
                .await?;
            failed(&s)?;
            let total = sum(&before, &nodes, |r| r.participants);
            // The nodes close the last participants at the deadline: a little longer.
            let s = c
                .follow(s, total, "participants moved", secs + 3, |s| {
                    let here = sum(s, &nodes, |r| r.participants);
                    (
                        here,
                        format!(
                            "{} draining: {here} of {total} participants left to move",
                            t.name(s)
                        ),
                    )
                })
                .await?;
            print(&s, json);
            let here = sum(&s, &nodes, |r| r.participants);
            let closed = sum(&s, &nodes, |r| r.closed_at_deadline).saturating_sub(sum(
                &before,
                &nodes,
                |r| r.closed_at_deadline,
            ));
            let moved = total.saturating_sub(here + closed);
            let line = format!(
                "{}: {moved} participants moved, {closed} closed at the deadline, {here} still here",
                t.name(&s)
            );
            eprintln!("{line}");
            failed(&s)?;
            if closed > 0 || here > 0 {
                return Err(CtlOutcome::LeftBehind(line).into());
            }
        }
        CtlCommand::Drain {
            node,
            region,
            wait,
            json,
            ..
        } => {
            let t = target(&node, &region);
            let mut s = c.post("/v1/admin/drain", &t, &[]).await?;
            failed(&s)?;
            let nodes = t.nodes(&s);
            if let Some(secs) = wait {
                let total = sum(&s, &nodes, |r| r.sessions);
                s = c
                    .follow(s, total, "sessions ended", secs, |s| {
                        let left = sum(s, &nodes, |r| r.sessions);
                        (
                            left,
                            format!("{} draining: {left} sessions left", t.name(s)),
                        )
                    })
                    .await?;
            }
            print(&s, json);
            if wait.is_some() {
                let left = sum(&s, &nodes, |r| r.sessions);
                if left > 0 {
                    return Err(CtlOutcome::LeftBehind(format!(
                        "{} still holds {left} sessions: they stay until they end (drain --deadline moves them)",
                        t.name(&s)
                    ))
                    .into());
                }
                eprintln!("{} is empty", t.name(&s));
            }
        }
        CtlCommand::Rebalance {
            region,
            node,
            below,
            deadline,
            wait,
            json,
        } => {
            let t = target(&node, &region);
            let mut s = c
                .post(
                    "/v1/admin/rebalance",
                    &t,
                    &[
                        ("below", below.to_string()),
                        ("deadline_secs", deadline.to_string()),
                    ],
                )
                .await?;
            failed(&s)?;
            let nodes = t.nodes(&s);
            let told = sum(&s, &nodes, |r| r.told_to_move);
            if wait && told > 0 {
                s = c
                    .follow(s, told, "participants moved", deadline, |s| {
                        let left = sum(s, &nodes, |r| r.moving);
                        (
                            left,
                            format!(
                                "{} rebalancing: {left} of {told} participants left to move",
                                t.name(s)
                            ),
                        )
                    })
                    .await?;
            }
            print(&s, json);
            let left = sum(&s, &nodes, |r| r.moving);
            let line = format!(
                "{}: {told} participants told to move, {} moved, {left} stayed",
                t.name(&s),
                if wait {
                    told.saturating_sub(left).to_string()
                } else {
                    "(not waited for)".into()
                }
            );
            eprintln!("{line}");
            if wait && left > 0 {
                return Err(CtlOutcome::LeftBehind(line).into());
            }
        }
    }
    Ok(())
}

struct Client<'a> {
    admin: &'a str,
    token: &'a str,
}

impl Client<'_> {
    async fn status(&self) -> Result<Status, crate::admin::CtlError> {
        call(self.admin, self.token, Method::GET, "/v1/admin/status").await
    }

    /// Posts an action, prints the mesh after it, and fails if a node did not carry it out.
    async fn act(
        &self,
        path: &str,
        t: &Target,
        extra: &[(&str, String)],
        json: bool,
    ) -> anyhow::Result<Status> {
        let s = self.post(path, t, extra).await?;
        print(&s, json);
        failed(&s)?;
        Ok(s)
    }

    /// Asks for the status once a second until `left` (what is left of `total`, and the line
    /// saying so) reaches 0 or `secs` pass, showing the progress; the last status.
    async fn follow(
        &self,
        mut s: Status,
        total: u64,
        unit: &str,
        secs: u64,
        left: impl Fn(&Status) -> (u64, String),
    ) -> Result<Status, crate::admin::CtlError> {
        let bar = Progress::new(total, unit);
        let until = Instant::now() + Duration::from_secs(secs);
        loop {
            let (n, line) = left(&s);
            let to_go = until.saturating_duration_since(Instant::now()).as_secs();
            bar.show(total.saturating_sub(n), &format!("{line}, {to_go} s to go"));
            if n == 0 || Instant::now() >= until {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            s = self.status().await?;
        }
        bar.finish();
        Ok(s)
    }

    async fn post(
        &self,
        path: &str,
        t: &Target,
        extra: &[(&str, String)],
    ) -> Result<Status, crate::admin::CtlError> {
        let mut q: Vec<String> = extra.iter().map(|(k, v)| format!("{k}={v}")).collect();
        match t {
            Target::Answering => {}
            Target::Node(n) => q.push(format!("node={n}")),
            Target::Region(r) => q.push(format!("region={r}")),
        }
        let path = if q.is_empty() {
            path.to_owned()
        } else {
            format!("{path}?{}", q.join("&"))
        };
        call(self.admin, self.token, Method::POST, &path).await
    }
}

/// Which nodes a command acts on.
enum Target {
    Answering,
    Node(NodeId),
    Region(RegionId),
}

fn target(node: &Option<NodeId>, region: &Option<RegionId>) -> Target {
    match (node, region) {
        (Some(n), _) => Target::Node(n.clone()),
        (None, Some(r)) => Target::Region(r.clone()),
        (None, None) => Target::Answering,
    }
}

impl Target {
    fn nodes(&self, s: &Status) -> Vec<NodeId> {
        match self {
            Target::Answering => vec![s.node.clone()],
            Target::Node(n) => vec![n.clone()],
            Target::Region(r) => s
                .nodes
                .iter()
                .filter(|m| &m.region == r)
                .map(|m| m.node.clone())
                .collect(),
        }
    }

    fn name(&self, s: &Status) -> String {
        match self {
            Target::Answering => s.node.to_string(),
            Target::Node(n) => n.to_string(),
            Target::Region(r) => format!("region {r}"),
        }
    }
}

/// A figure summed over the reports of `nodes`.
fn sum(s: &Status, nodes: &[NodeId], f: impl Fn(&crate::admin::NodeReport) -> u64) -> u64 {
    nodes.iter().filter_map(|n| s.report(n)).map(f).sum()
}

fn print(s: &Status, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(s).unwrap_or_default());
    } else {
        print!("{}", table(s));
    }
}

/// Nodes that did not answer or refused: reported, and the exit status says so.
fn failed(s: &Status) -> Result<(), CtlOutcome> {
    if s.errors.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = s
        .errors
        .iter()
        .map(|e| format!("{}: {}", e.node, e.error))
        .collect();
    Err(CtlOutcome::NodesFailed(lines.join("\n")))
}

/// A progress bar on a terminal; a line a second otherwise (logs, scripts, tests).
struct Progress(Option<indicatif::ProgressBar>);

impl Progress {
    fn new(total: u64, unit: &str) -> Self {
        if !std::io::stderr().is_terminal() {
            return Progress(None);
        }
        let bar = indicatif::ProgressBar::new(total);
        let style = indicatif::ProgressStyle::with_template(&format!(
            "{{bar:30}} {{pos}}/{{len}} {unit} · {{msg}}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        bar.set_style(style);
        Progress(Some(bar))
    }

    fn show(&self, done: u64, line: &str) {
        match &self.0 {
            Some(bar) => {
                bar.set_position(done);
                bar.set_message(line.to_owned());
            }
            None => eprintln!("{line}"),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

/// `30s`, `2m`, `1h` or plain seconds.
pub fn parse_duration_secs(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (number, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration: write 30s, 2m or 1h"))?;
    match unit {
        "s" => Ok(n),
        "m" => Ok(n * 60),
        "h" => Ok(n * 3600),
        _ => Err(format!("`{text}`: the unit must be s, m or h")),
    }
}
