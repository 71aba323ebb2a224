//! `/metrics`: the node's figures in the OpenMetrics text format, encoded by
//! `prometheus-client` from a [`Collector`] that reads the workers' atomics, the mesh's and
//! the recorder's counters at scrape time. Every name is documented in docs/metrics.md; the
//! dashboards and alert rules in `infra/` use exactly these names (a test checks them against
//! a live scrape).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;

use super::AppState;
use crate::metrics::{counter, gauge, histogram, scalar_counter, scalar_gauge};
use crate::sfu::WorkerStats;

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The whole exposition; `region` and `node` labels on every series.
pub fn render(state: &AppState) -> String {
    let mut registry = Registry::with_labels(
        [
            ("region".into(), state.region.to_string().into()),
            ("node".into(), state.node.to_string().into()),
        ]
        .into_iter(),
    );
    registry.register_collector(Box::new(Node(state.clone())));
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        tracing::warn!(error = %e, "metrics could not be encoded");
    }
    out
}

struct Node(AppState);

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Node")
            .field(&self.0.node.to_string())
            .finish()
    }
}

impl Collector for Node {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> fmt::Result {
        let s = &self.0;
        workers(s, &mut enc)?;
        signaling(s, &mut enc)?;
        process(s, &mut enc)?;
        pipes(s, &mut enc)?;
        membership(s, &mut enc)?;
        recording(s, &mut enc)
    }
}

type Field = fn(&WorkerStats) -> &AtomicU64;

/// Counters of each worker (a hot or stuck worker shows; sum over `worker` for the node).
const WORKER_COUNTERS: &[(&str, &str, Field)] = &[
    (
        "meridian_datagrams_in",
        "UDP datagrams received on the media port",
        |w| &w.datagrams_in,
    ),
    (
        "meridian_datagrams_out",
        "UDP datagrams sent from the media port",
        |w| &w.datagrams_out,
    ),
    (
        "meridian_media_bytes_in",
        "Bytes of the datagrams received on the media port (bitrate in: rate of this)",
        |w| &w.bytes_in,
    ),
    (
        "meridian_media_bytes_out",
        "Bytes of the datagrams sent from the media port (bitrate out: rate of this)",
        |w| &w.bytes_out,
    ),
    (
        "meridian_datagrams_unroutable",
        "Datagrams from unknown peers or rejected by their connection",
        |w| &w.datagrams_unroutable,
    ),
    (
        "meridian_datagrams_oversized",
        "Datagrams larger than rtc.max_datagram_bytes",
        |w| &w.datagrams_oversized,
    ),
    (
        "meridian_rtp_in",
        "RTP packets received from producers",
        |w| &w.rtp_in,
    ),
    (
        "meridian_rtp_forwarded",
        "RTP packets written to consumers",
        |w| &w.rtp_forwarded,
    ),
    (
        "meridian_rtp_dropped_layer",
        "RTP packets not forwarded because the consumer uses another simulcast layer",
        |w| &w.rtp_dropped_layer,
    ),
    (
        "meridian_rtp_retransmitted",
        "RTP packets sent again to consumers on their NACK",
        |w| &w.rtp_retransmitted,
    ),
    (
        "meridian_nacks_received",
        "Packets subscribers asked for again (NACKed sequence numbers)",
        |w| &w.nacks_received,
    ),
    (
        "meridian_nack_unserved",
        "Consumer NACKs for packets no longer in the producer's cache",
        |w| &w.nack_unserved,
    ),
    (
        "meridian_nack_unserved_no_rtx",
        "Consumer NACKs not served: no RTX negotiated while packets are numbered transport-wide",
        |w| &w.nack_unserved_no_rtx,
    ),
    (
        "meridian_rtx_unsafe_dropped",
        "Repairs or probes dropped: their stream has no RTX on a transport-cc connection",
        |w| &w.rtx_unsafe_dropped,
    ),
    (
        "meridian_keyframe_requests_unrepaired_loss",
        "Keyframe requests to publishers because a packet lost on their uplink stayed unrepaired",
        |w| &w.keyframe_requests_unrepaired_loss,
    ),
    (
        "meridian_srtp_in_place_connections",
        "Subscribe connections whose forwarded copies Meridian encrypts in place",
        |w| &w.srtp_in_place_connections,
    ),
    (
        "meridian_srtp_fallback_connections",
        "Subscribe connections whose copies go through rtc's sender (keys not taken, key mismatch, or in-place encryption off)",
        |w| &w.srtp_fallback_connections,
    ),
    (
        "meridian_srtp_key_mismatch",
        "SRTP keys taken from rtc that did not decrypt rtc's own SRTCP",
        |w| &w.srtp_key_mismatch,
    ),
    (
        "meridian_sender_reports",
        "RTCP sender reports sent for streams encrypted in place",
        |w| &w.sender_reports,
    ),
    (
        "meridian_keyframe_requests",
        "PLIs sent to publishers",
        |w| &w.keyframe_requests,
    ),
    (
        "meridian_keyframe_requests_received",
        "PLIs and FIRs received from subscribers",
        |w| &w.keyframe_requests_received,
    ),
    (
        "meridian_keyframes_in",
        "Keyframes that arrived from publishers",
        |w| &w.keyframes_in,
    ),
    (
        "meridian_layer_switches",
        "Simulcast consumers moved from one layer to another",
        |w| &w.layer_switches,
    ),
    (
        "meridian_probe_clusters",
        "Bandwidth probe clusters sent to subscribers",
        |w| &w.probe_clusters,
    ),
    (
        "meridian_probes_confirmed",
        "Probe clusters that arrived at the rate the consumers want",
        |w| &w.probes_confirmed,
    ),
    (
        "meridian_probes_refused",
        "Probe clusters that arrived slower, lost too much or got no feedback",
        |w| &w.probes_refused,
    ),
    (
        "meridian_probes_unsaturated",
        "Probe clusters the path carried whole but the node sent slower than asked",
        |w| &w.probes_unsaturated,
    ),
    (
        "meridian_probe_packets",
        "RTX packets sent as bandwidth probes",
        |w| &w.probe_packets,
    ),
    ("meridian_send_errors", "Media socket send failures", |w| {
        &w.send_errors
    }),
    (
        "meridian_recv_errors",
        "Media socket receive failures",
        |w| &w.recv_errors,
    ),
    (
        "meridian_send_syscalls",
        "System calls that sent media datagrams (several per call when batched)",
        |w| &w.send_syscalls,
    ),
    (
        "meridian_stun_unauthenticated",
        "Binding requests from unbound addresses whose MESSAGE-INTEGRITY did not verify",
        |w| &w.stun_unauthenticated,
    ),
    (
        "meridian_stun_rate_limited",
        "Binding requests from unbound addresses dropped by the per-source rate limit",
        |w| &w.stun_rate_limited,
    ),
    (
        "meridian_tcp_refused",
        "ICE-TCP connections refused at accept (node or source at its cap)",
        |w| &w.tcp_refused,
    ),
    (
        "meridian_tcp_timed_out",
        "ICE-TCP connections closed unauthenticated, idle or not reading",
        |w| &w.tcp_timed_out,
    ),
    (
        "meridian_pipe_media_dropped",
        "Pipe media datagrams dropped because the media worker's queue was full",
        |w| &w.pipe_media_dropped,
    ),
    (
        "meridian_pipe_frames_unknown",
        "Pipe media frames of a stream no producer on the worker is fed from",
        |w| &w.pipe_frames_unknown,
    ),
];

/// Gauges of each worker.
const WORKER_GAUGES: &[(&str, &str, Field)] = &[
    (
        "meridian_sessions",
        "Sessions (routers) on each worker",
        |w| &w.sessions,
    ),
    (
        "meridian_participants",
        "Participants on each worker",
        |w| &w.participants,
    ),
    ("meridian_producers", "Producers on each worker", |w| {
        &w.producers
    }),
    ("meridian_consumers", "Consumers on each worker", |w| {
        &w.consumers
    }),
    (
        "meridian_peer_connections",
        "WebRTC peer connections on each worker",
        |w| &w.peer_connections,
    ),
];

fn workers(s: &AppState, enc: &mut DescriptorEncoder<'_>) -> fmt::Result {
    let label = |i: usize| [("worker", i.to_string())];
    for &(name, help, field) in WORKER_COUNTERS {
        let samples = s.workers.iter().enumerate();
        counter(
            enc,
            name,
            help,
            samples.map(|(i, w)| (label(i), field(w.stats()).load(Relaxed))),
        )?;
    }
    for &(name, help, field) in WORKER_GAUGES {
        let samples = s.workers.iter().enumerate();
        gauge(
            enc,
            name,
            help,
            samples.map(|(i, w)| (label(i), field(w.stats()).load(Relaxed))),
        )?;
    }
    // Distributions over the node's workers, by direction: downstream is what subscribers
    // report of the streams sent to them (RTCP receiver reports), upstream what this node
    // measures of what publishers send.
    let t = s.workers.stats();
    let down = [("direction", "downstream")];
    let up = [("direction", "upstream")];
    histogram(
        enc,
        "meridian_rtcp_rtt_seconds",
        "Round-trip time from RTCP receiver reports answering the node's sender reports",
        [(down, &t.rtt_downstream)],
    )?;
    histogram(
        enc,
        "meridian_rtcp_jitter_seconds",
        "Interarrival jitter: reported by subscribers (downstream), measured on publishers' streams each second (upstream)",
        [(down, &t.jitter_downstream), (up, &t.jitter_upstream)],
    )?;
    histogram(
        enc,
        "meridian_rtcp_loss_ratio",
        "Share of packets lost: reported by subscribers (downstream), measured on publishers' streams each second (upstream)",
        [(down, &t.loss_downstream), (up, &t.loss_upstream)],
    )?;
    histogram(
        enc,
        "meridian_first_frame_seconds",
        "From a video consumer's creation to its first forwarded packet (a keyframe)",
        [([("kind", "video")], &t.first_frame)],
    )
}

fn signaling(s: &AppState, enc: &mut DescriptorEncoder<'_>) -> fmt::Result {
    let a = &s.admission;
    let w = s.workers.stats();
    scalar_counter(
        enc,
        "meridian_signaling_connections",
        "WebSocket connections accepted",
        s.metrics.connections.load(Relaxed),
    )?;
    scalar_gauge(
        enc,
        "meridian_signaling_open_connections",
        "Signaling connections open now",
        a.open() as u64,
    )?;
    counter(
        enc,
        "meridian_signaling_refused",
        "Signaling connections refused at accept, by reason",
        [
            ([("reason", "node_full")], a.refused_full.load(Relaxed)),
            ([("reason", "source_full")], a.refused_source.load(Relaxed)),
        ],
    )?;
    counter(
        enc,
        "meridian_participants_dismissed",
        "Participants the node let go, by reason",
        [
            ([("reason", "too_slow")], w.events_overflowed.load(Relaxed)),
            (
                [("reason", "replaced")],
                w.participants_replaced.load(Relaxed),
            ),
        ],
    )?;
    let errors: Vec<(&'static str, u64)> = s
        .metrics
        .errors
        .lock()
        .map(|m| m.iter().map(|(k, v)| (*k, *v)).collect())
        .unwrap_or_default();
    counter(
        enc,
        "meridian_signaling_errors",
        "Signaling and admin input refused, by code (auth failures: token_*, admin_token_*)",
        errors.into_iter().map(|(code, v)| ([("code", code)], v)),
    )?;
    scalar_gauge(
        enc,
        "meridian_signaling_parked",
        "Participants whose connection was lost, keeping their place for the resume grace period",
        s.parking.len() as u64,
    )?;
    counter(
        enc,
        "meridian_signaling_resumes",
        "Lost connections by outcome: the client came back (resumed) or the grace period ended (expired)",
        [
            ([("outcome", "resumed")], s.parking.resumed.load(Relaxed)),
            ([("outcome", "expired")], s.parking.expired.load(Relaxed)),
        ],
    )?;
    s.metrics.experience.encode(enc)
}

fn process(s: &AppState, enc: &mut DescriptorEncoder<'_>) -> fmt::Result {
    let pid = std::process::id();
    if let Some(ns) = crate::procfs::process_cpu_ns(pid) {
        enc.encode_descriptor(
            "meridian_process_cpu_seconds",
            "CPU time of every thread of the node's process",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?
        .encode_counter::<prometheus_client::encoding::NoLabelSet, f64, f64>(
            &(ns as f64 / 1e9),
            None,
        )?;
    }
    if let Some(kib) = crate::procfs::rss_kib(pid) {
        scalar_gauge(
            enc,
            "meridian_process_resident_memory_bytes",
            "Resident memory of the node's process",
            kib * 1024,
        )?;
    }
    scalar_gauge(
        enc,
        "meridian_draining",
        "1 while an operator has drained the node (no new sessions)",
        u64::from(s.availability.drained()),
    )?;
    scalar_gauge(
        enc,
        "meridian_healthy",
        "0 while a media worker does not answer (the node is out of routing)",
        u64::from(!s.availability.unhealthy()),
    )?;
    let a = crate::alloc::counts();
    counter(
        enc,
        "meridian_allocations",
        "Heap allocations (0 unless the meridian binary's counting allocator is installed)",
        [
            ([("thread", "all"), ("code", "all")], a.total),
            ([("thread", "media"), ("code", "meridian")], a.worker_own),
            ([("thread", "media"), ("code", "rtc")], a.worker_rtc),
            ([("thread", "media"), ("code", "copy_path")], a.worker_copy),
        ],
    )
}

fn pipes(s: &AppState, enc: &mut DescriptorEncoder<'_>) -> fmt::Result {
    let Some(pipes) = &s.pipes else {
        return Ok(());
    };
    let reports = pipes();
    let peer = |p: &crate::mesh::PipeReport| [("peer", p.node.to_string())];
    gauge(
        enc,
        "meridian_pipe_rtt_seconds",
        "Smoothed round-trip time of each pipe",
        reports.iter().map(|p| (peer(p), p.rtt.as_secs_f64())),
    )?;
    type Get = fn(&crate::mesh::PipeReport) -> u64;
    let counters: [(&str, &str, Get); 8] = [
        (
            "meridian_pipe_bytes_out",
            "Media bytes sent on each pipe",
            |p| p.bytes_out,
        ),
        (
            "meridian_pipe_bytes_in",
            "Media bytes received on each pipe",
            |p| p.bytes_in,
        ),
        (
            "meridian_pipe_lost_packets",
            "QUIC packets each pipe detected as lost",
            |p| p.lost_packets,
        ),
        (
            "meridian_pipe_sent_packets",
            "QUIC packets each pipe sent",
            |p| p.sent_packets,
        ),
        (
            "meridian_pipe_nacked",
            "Media packets asked for again on each pipe",
            |p| p.nacked,
        ),
        (
            "meridian_pipe_retransmitted",
            "Media packets resent on each pipe",
            |p| p.retransmitted,
        ),
        (
            "meridian_pipe_send_failed",
            "Media datagrams the pipe refused (too large, connection gone)",
            |p| p.send_failed,
        ),
        (
            "meridian_pipe_send_displaced",
            "Media datagrams sent into a full QUIC send buffer, each dropping older queued ones",
            |p| p.send_displaced,
        ),
    ];
    for (name, help, get) in counters {
        counter(enc, name, help, reports.iter().map(|p| (peer(p), get(p))))?;
    }
    Ok(())
}

fn membership(s: &AppState, enc: &mut DescriptorEncoder<'_>) -> fmt::Result {
    let members = s.edge.members.borrow().clone();
    scalar_gauge(
        enc,
        "meridian_members",
        "Nodes in the mesh as this node sees it, itself included",
        members.len() as u64,
    )?;
    gauge(
        enc,
        "meridian_member_load",
        "Load factor of each member (1 = at capacity)",
        members.iter().map(|m| {
            (
                [
                    ("member", m.info.node.to_string()),
                    ("member_region", m.info.region.to_string()),
                    ("draining", m.draining.to_string()),
                ],
                m.load.factor,
            )
        }),
    )?;
    let e = &s.edge.metrics;
    counter(
        enc,
        "meridian_edge_decisions",
        "Edge answers given, by why the first node was chosen",
        [
            ("nearest", &e.nearest),
            ("override", &e.overridden),
            ("hint", &e.hinted),
            ("default", &e.defaulted),
            ("unlocated", &e.unlocated),
            ("leastLoaded", &e.least_loaded),
        ]
        .map(|(reason, c)| ([("reason", reason)], c.load(Relaxed))),
    )?;
    scalar_counter(
        enc,
        "meridian_edge_unavailable",
        "Edge requests refused because every node was draining, down or full",
        e.no_edge.load(Relaxed),
    )?;
    scalar_counter(
        enc,
        "meridian_edge_untrusted_forwarding",
        "Forwarding headers ignored because the sender is not a trusted proxy",
        e.untrusted_forwarding.load(Relaxed),
    )?;
    let Some(m) = &s.mesh_stats else {
        return Ok(());
    };
    scalar_counter(
        enc,
        "meridian_discovery_errors",
        "DNS discovery lookups that failed",
        m.discovery_errors.load(Relaxed),
    )?;
    scalar_gauge(
        enc,
        "meridian_discovery_peers",
        "Peers in the last DNS answer",
        m.peers_discovered.load(Relaxed),
    )?;
    scalar_counter(
        enc,
        "meridian_peers_silent",
        "Peers declared down after missing heartbeats",
        m.peers_silent.load(Relaxed),
    )?;
    scalar_counter(
        enc,
        "meridian_pipe_handshakes_refused",
        "Pipe handshakes refused or failed",
        m.handshakes_refused.load(Relaxed),
    )?;
    scalar_counter(
        enc,
        "meridian_pipe_identity_mismatches",
        "Pipes refused because the Hello named another node or region than the certificate",
        m.identity_mismatches.load(Relaxed),
    )?;
    scalar_counter(
        enc,
        "meridian_pipe_control_errors",
        "Control messages from peers that did not decode (their pipe closed) or carried a value out of range",
        m.control_errors.load(Relaxed),
    )
}

fn recording(s: &AppState, enc: &mut DescriptorEncoder<'_>) -> fmt::Result {
    let Some(rec) = &s.recorder else {
        return Ok(());
    };
    let m = rec.media().stats();
    let r = rec.stats();
    let counters = [
        ("meridian_recording_packets", "Media packets copied to the recording", m.packets.load(Relaxed)),
        ("meridian_recording_dropped_packets", "Media packets not recorded because the media writer was behind (disk too slow)", m.dropped.load(Relaxed)),
        ("meridian_recording_frames", "Frames written to recording files", m.frames.load(Relaxed)),
        ("meridian_recording_gaps", "Gaps in recorded streams given up after waiting for repair", m.gaps.load(Relaxed)),
        ("meridian_recording_media_bytes", "Bytes of frames written to recording files", m.bytes.load(Relaxed)),
        ("meridian_recording_unplaceable_frames", "H.264 frames not recorded because their stream never sent parameter sets (SPS/PPS)", m.unplaceable.load(Relaxed)),
        ("meridian_recording_media_failures", "Recording files that could not be created, written or finished", m.failures.load(Relaxed)),
        ("meridian_recording_sessions_sealed", "Session folders sealed when their last participant left", r.sessions_sealed.load(Relaxed)),
        ("meridian_recording_entries", "Audit entries written", r.entries.load(Relaxed)),
        ("meridian_recording_failures", "Audit entries, snapshots or seals that could not be written (disk full, folder not writable)", r.failures.load(Relaxed)),
        ("meridian_recording_refusals_unrecorded", "Refused joins of an idle session beyond the runs it may get per hour (refused and logged, no run)", r.refusals_unrecorded.load(Relaxed)),
        ("meridian_recording_database_failures", "Session database updates that failed (the session folder is still written)", r.db_failures()),
    ];
    for (name, help, v) in counters {
        scalar_counter(enc, name, help, v)?;
    }
    scalar_gauge(
        enc,
        "meridian_recording_files_open",
        "Recording files being written",
        m.files_open.load(Relaxed),
    )?;
    let Some(st) = r.storage() else {
        return Ok(());
    };
    scalar_counter(
        enc,
        "meridian_storage_uploaded",
        "Sealed session runs copied to the object store and checked there",
        st.uploaded.load(Relaxed),
    )?;
    scalar_counter(
        enc,
        "meridian_storage_bytes",
        "Bytes copied to the object store",
        st.bytes.load(Relaxed),
    )?;
    scalar_gauge(
        enc,
        "meridian_storage_pending_uploads",
        "Sealed runs waiting for (or retrying) their upload",
        st.pending.load(Relaxed),
    )?;
    scalar_counter(
        enc,
        "meridian_storage_failures",
        "Upload attempts that failed (retried with backoff) and runs the full queue turned away (stored at the next start)",
        st.failures.load(Relaxed),
    )
}
