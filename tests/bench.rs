//! The fan-out benchmark runs end to end against a separate node process and reports figures
//! that are internally consistent. Speeds are reported by the benchmark, never asserted here.

use std::process::Command;

/// Runs `meridian bench <args> --json <json>`; returns what it printed.
fn bench(args: &[&str], json: &std::path::Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .arg("bench")
        .args(args)
        .arg("--json")
        .arg(json)
        .env("RUST_LOG", "error")
        .output()
        .expect("run meridian bench");
    assert!(
        out.status.success(),
        "bench failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn fanout_benchmark_measures_a_separate_node_process() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("fanout.json");
    let stdout = bench(
        &[
            "fanout",
            "--subscribers",
            "1,3",
            "--seconds",
            "2",
            "--warmup",
            "1",
            "--with-rtc-sender",
        ],
        &json,
    );
    assert!(stdout.contains("cpu_us/pkt"), "{stdout}");
    assert!(
        dir.path().join("fanout.svg").exists(),
        "the plot is written beside the JSON"
    );
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for sfu in ["meridian", "meridian-rtc-sender"] {
        let steps = results[sfu].as_array().unwrap();
        assert_eq!(steps.len(), 2);
        for (step, n) in steps.iter().zip([1.0, 3.0]) {
            assert_eq!(step["subscribers"].as_f64().unwrap(), n);
            let pin = step["packets_in_per_s"].as_f64().unwrap();
            let pout = step["packets_out_per_s"].as_f64().unwrap();
            // ~114 packets/s at 1 Mbit/s in 1100-byte payloads, fanned out n times.
            assert!(pin > 50.0, "{sfu}: {step}");
            assert!(
                (pout / pin - n).abs() < 0.2 * n,
                "{sfu}: out = in × subscribers: {step}"
            );
            assert!(step["cpu_us_per_forwarded_packet"].as_f64().unwrap() > 0.0);
            assert!(step["latency_p50_us"].as_u64().unwrap() > 0);
            assert!(
                step["loss_percent"].as_f64().unwrap() < 5.0,
                "{sfu}: {step}"
            );
        }
    }
    // The node counts its allocations, and those made while writing copies apart. Encrypted
    // in place a copy allocates nothing once its buffers are pooled (a rare one is a table
    // growing, hence the margin; this counts, it does not time). Through rtc's sender a copy
    // allocates inside `write_rtp` and again inside rtc when the connection is drained
    // (marshal, interceptors, SRTP), which shows in the rtc column.
    let figure = |sfu: &str, i: usize, what: &str| results[sfu][i][what].as_f64().unwrap();
    for i in 0..2 {
        let in_place = figure("meridian", i, "allocs_per_copy");
        let rtc_sender = figure("meridian-rtc-sender", i, "allocs_per_copy");
        assert!(in_place < 0.1, "in place: {in_place} per copy");
        assert!(rtc_sender >= 1.0, "inside write_rtp: {rtc_sender} per copy");
        assert!(results["meridian"][i]["allocs_per_packet_meridian"].is_f64());
    }
    let drained = figure("meridian-rtc-sender", 1, "allocs_per_packet_rtc")
        - figure("meridian", 1, "allocs_per_packet_rtc");
    assert!(drained > 3.0, "rtc's send path: {drained} more per copy");
    assert!(
        stdout.contains("allocs/pkt(own+rtc)  allocs/copy"),
        "{stdout}"
    );
    assert!(stdout.contains("rtc's sender / in place CPU"), "{stdout}");
}

#[test]
fn sessions_benchmark_runs_each_worker_count_against_a_separate_node_process() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("sessions.json");
    let stdout = bench(
        &[
            "sessions",
            "--sessions",
            "1,3",
            "--workers",
            "1,2",
            "--seconds",
            "2",
            // Every agent probes its way to the top layer first (2-6 s here, more under load).
            "--warmup",
            "10",
        ],
        &json,
    );
    assert!(stdout.contains("sessions/core"), "{stdout}");
    assert!(dir.path().join("sessions.svg").exists());
    let results: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let steps: Vec<(u64, u64)> = results
        .iter()
        .map(|r| {
            (
                r["workers"].as_u64().unwrap(),
                r["sessions"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(steps, vec![(1, 1), (1, 3), (2, 1), (2, 3)]);
    for r in &results {
        let n = r["sessions"].as_f64().unwrap();
        let pin = r["packets_in_per_s"].as_f64().unwrap();
        let pout = r["packets_out_per_s"].as_f64().unwrap();
        // Per session: the user's three layers (17 + 57 + 136) and audio (50), the agent's
        // video (136) and audio (50) in; out, the agent gets the top layer and audio, the user
        // the agent's video and audio: 372 of the 446.
        assert!((pin / n - 446.0).abs() < 0.15 * 446.0, "{r}");
        assert!((pout / n - 372.0).abs() < 0.15 * 372.0, "{r}");
        let cpu = r["cpu_percent_of_core"].as_f64().unwrap();
        let per_session = r["cpu_percent_per_session"].as_f64().unwrap();
        assert!(
            cpu > 0.0 && (per_session * n - cpu).abs() < 1e-6 * cpu.max(1.0),
            "{r}"
        );
        assert!(r["cpu_us_per_packet"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["rss_kib"].as_u64().unwrap() > 0, "{r}");
        assert!(r["latency_p50_us"].as_u64().unwrap() > 0, "{r}");
        assert!(
            r["latency_p99_us"].as_u64().unwrap() >= r["latency_p50_us"].as_u64().unwrap(),
            "{r}"
        );
        assert!(r["loss_percent"].as_f64().unwrap() < 5.0, "{r}");
    }
}
