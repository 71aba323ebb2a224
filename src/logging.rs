//! The log filter. `RUST_LOG` decides, except that the WebRTC stack's own crates stay at
//! `warn` (DTLS at `error`) unless a directive names them: at `debug` they print ICE
//! passwords and full client addresses, which Meridian's own logs never do (see STYLE.md).

/// Dependency targets kept quiet unless named, with the level they keep.
const QUIET: [(&str, &str); 3] = [("rtc", "warn"), ("rtc_dtls", "error"), ("webrtc", "warn")];

/// `tracing_subscriber::EnvFilter` directives for a `RUST_LOG` value (`None`: unset).
pub fn directives(rust_log: Option<&str>) -> String {
    let asked = rust_log.map(str::trim).filter(|s| !s.is_empty());
    let mut out = asked.unwrap_or("info").to_owned();
    for (target, level) in QUIET {
        let named = asked.is_some_and(|a| {
            a.split(',')
                .any(|d| d.trim().split(['=', '[']).next() == Some(target))
        });
        if !named {
            out.push_str(&format!(",{target}={level}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webrtc_crates_stay_quiet_at_debug_unless_named() {
        let has = |d: &str, directive: &str| d.split(',').any(|x| x == directive);
        let d = directives(Some("debug"));
        assert!(d.starts_with("debug,"));
        assert!(has(&d, "rtc=warn") && has(&d, "rtc_dtls=error"), "{d}");
        let d = directives(Some("debug,rtc=trace"));
        assert!(!has(&d, "rtc=warn"), "{d}");
        assert!(has(&d, "rtc_dtls=error"), "{d}");
        assert_eq!(directives(None), "info,rtc=warn,rtc_dtls=error,webrtc=warn");
    }
}
