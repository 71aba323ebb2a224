//! Keyframe detection from the first RTP payload bytes of VP8, VP9 and H.264, enough to know
//! where a consumer may start or switch layers. Never panics on truncated payloads.

use super::Codec;

/// Whether this RTP payload starts (or carries the start of) a keyframe.
pub fn is_keyframe(codec: Codec, payload: &[u8]) -> bool {
    match codec {
        Codec::Vp8 => vp8_keyframe(payload),
        Codec::Vp9 => vp9_keyframe(payload),
        Codec::H264 => h264_keyframe(payload),
        Codec::Opus => true,
    }
}

fn vp8_keyframe(p: &[u8]) -> bool {
    // RFC 7741 payload descriptor.
    let Some(&b0) = p.first() else { return false };
    let start_of_partition = b0 & 0x10 != 0;
    let partition_id = b0 & 0x0f;
    if !start_of_partition || partition_id != 0 {
        return false;
    }
    let mut at = 1;
    if b0 & 0x80 != 0 {
        let Some(&x) = p.get(at) else { return false };
        at += 1;
        if x & 0x80 != 0 {
            // PictureID: one byte, or two when its M bit is set.
            let Some(&pid) = p.get(at) else { return false };
            at += if pid & 0x80 != 0 { 2 } else { 1 };
        }
        if x & 0x40 != 0 {
            at += 1; // TL0PICIDX
        }
        if x & 0x30 != 0 {
            at += 1; // TID/Y/KEYIDX
        }
    }
    // VP8 payload header: P bit (bit 0 of the first byte) is 0 for a keyframe.
    p.get(at).is_some_and(|b| b & 0x01 == 0)
}

fn vp9_keyframe(p: &[u8]) -> bool {
    // RFC 9628 descriptor first byte: I P L F B E V Z.
    let Some(&b0) = p.first() else { return false };
    let inter_predicted = b0 & 0x40 != 0;
    let begin = b0 & 0x08 != 0;
    !inter_predicted && begin
}

fn h264_keyframe(p: &[u8]) -> bool {
    let Some(&b0) = p.first() else { return false };
    match b0 & 0x1f {
        5 | 7 => true,
        24 => {
            // STAP-A: 16-bit size then NAL unit, repeated.
            let mut at = 1;
            while at + 2 < p.len() {
                let size = u16::from_be_bytes([p[at], p[at + 1]]) as usize;
                if let Some(&nal) = p.get(at + 2) {
                    if matches!(nal & 0x1f, 5 | 7) {
                        return true;
                    }
                }
                at += 2 + size;
            }
            false
        }
        28 => p.get(1).is_some_and(|fu| fu & 0x80 != 0 && fu & 0x1f == 5),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vp8_keyframe_and_delta_frame_are_told_apart() {
        // X=1,S=1,PID=0; I=1 with 2-byte picture id; payload header P=0.
        assert!(is_keyframe(Codec::Vp8, &[0x90, 0x80, 0x81, 0x23, 0x10]));
        assert!(!is_keyframe(Codec::Vp8, &[0x90, 0x80, 0x81, 0x23, 0x11]));
        // Not the start of partition 0.
        assert!(!is_keyframe(Codec::Vp8, &[0x80, 0x80, 0x01, 0x10]));
        // Minimal descriptor.
        assert!(is_keyframe(Codec::Vp8, &[0x10, 0x9c]));
    }

    #[test]
    fn h264_idr_in_single_stap_and_fu_is_found() {
        assert!(is_keyframe(Codec::H264, &[0x65, 0]));
        assert!(is_keyframe(
            Codec::H264,
            &[0x78, 0, 2, 0x67, 0x42, 0, 1, 0x68]
        ));
        assert!(is_keyframe(Codec::H264, &[0x7c, 0x85]));
        assert!(!is_keyframe(Codec::H264, &[0x7c, 0x05]));
        assert!(!is_keyframe(Codec::H264, &[0x41, 0]));
    }

    #[test]
    fn truncated_payloads_are_not_keyframes_and_do_not_panic() {
        for codec in [Codec::Vp8, Codec::Vp9, Codec::H264] {
            assert!(!is_keyframe(codec, &[]));
            for b in 0..=255u8 {
                let _ = is_keyframe(codec, &[b]);
                let _ = is_keyframe(codec, &[b, 0xff]);
                let _ = is_keyframe(codec, &[0x78, b, 0xff]);
            }
        }
    }
}
