//! One participant's recording as a WebM file (VP8/VP9 with Opus) or a Matroska file (H.264),
//! written with `webm-iterable`'s EBML writer: the file header, then a cluster about every
//! second, each written whole and flushed, so that a file cut by a crash plays up to its last
//! cluster. Closing the file writes its duration and the segment's size into the places the
//! header kept for them.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use webm_iterable::matroska_spec::{Master, MatroskaSpec, SimpleBlock};
use webm_iterable::WebmWriter;

use crate::media::Codec;

/// A cluster is closed (and flushed) once it spans this much.
pub const CLUSTER_MS: u64 = 1000;
/// Opus's seek pre-roll, as WebM asks for it (nanoseconds).
const OPUS_SEEK_PRE_ROLL_NS: u64 = 80_000_000;
/// Seconds from the Unix epoch to Matroska's (2001-01-01T00:00:00Z).
const MATROSKA_EPOCH: u64 = 978_307_200;
/// Bytes of the EBML Void element kept in the header for the duration (ID, size, 8 bytes of
/// float, as the Duration element takes the same room).
const DURATION_ROOM: usize = 11;

#[derive(Debug, thiserror::Error)]
pub enum MediaFileError {
    #[error("cannot write the recording {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot encode the recording {path}: {detail}")]
    Encode { path: PathBuf, detail: String },
    #[error("track {0} is not in this file")]
    UnknownTrack(u64),
}

/// One track of a file, as its header states it.
#[derive(Debug, Clone)]
pub struct TrackSpec {
    /// 1, 2, …
    pub number: u64,
    pub codec: Codec,
    pub name: String,
    /// Video: the picture size known when the file starts (decoders follow the stream's own).
    pub size: (u16, u16),
    /// Audio channels.
    pub channels: u8,
    /// H.264: the `avcC` record.
    pub codec_private: Option<Vec<u8>>,
}

/// The container a set of tracks needs: WebM holds VP8, VP9 and Opus only.
pub fn extension(tracks: &[TrackSpec]) -> &'static str {
    if tracks.iter().any(|t| t.codec == Codec::H264) {
        "mkv"
    } else {
        "webm"
    }
}

/// What a finished file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileSummary {
    pub bytes: u64,
    pub duration_ms: u64,
    pub frames: u64,
}

/// Counts what goes to the file and keeps its first bytes, where the header's placeholders are.
struct Sink {
    file: BufWriter<File>,
    written: u64,
    head: Vec<u8>,
}

const HEAD_KEPT: usize = 4096;

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        if self.head.len() < HEAD_KEPT {
            let take = n.min(HEAD_KEPT - self.head.len());
            self.head.extend_from_slice(&buf[..take]);
        }
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

pub struct MediaFile {
    path: PathBuf,
    w: WebmWriter<Sink>,
    tracks: Vec<TrackSpec>,
    /// Where the segment's size goes, and where its data starts.
    segment_size_at: u64,
    segment_data_at: u64,
    duration_at: u64,
    cluster: Option<u64>,
    last_ms: u64,
    frames: u64,
    /// When the first cluster not yet synced to disk was written.
    unsynced: Option<std::time::Instant>,
    /// Each track's last frame time.
    track_last: Vec<Option<u64>>,
}

fn ebml_err(path: &Path, e: impl std::fmt::Display) -> MediaFileError {
    MediaFileError::Encode {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

fn opus_head(channels: u8) -> Vec<u8> {
    let mut h = b"OpusHead".to_vec();
    h.push(1);
    h.push(channels.max(1));
    h.extend_from_slice(&0u16.to_le_bytes()); // pre-skip
    h.extend_from_slice(&48_000u32.to_le_bytes());
    h.extend_from_slice(&0i16.to_le_bytes()); // output gain
    h.push(0); // mapping family
    h
}

fn track_entry(t: &TrackSpec) -> MatroskaSpec {
    let mut c = vec![
        MatroskaSpec::TrackNumber(t.number),
        MatroskaSpec::TrackUID(t.number),
        MatroskaSpec::FlagLacing(0),
        MatroskaSpec::Name(t.name.clone()),
    ];
    match t.codec {
        Codec::Opus => {
            c.push(MatroskaSpec::TrackType(2));
            c.push(MatroskaSpec::CodecID("A_OPUS".into()));
            c.push(MatroskaSpec::CodecPrivate(opus_head(t.channels)));
            c.push(MatroskaSpec::SeekPreRoll(OPUS_SEEK_PRE_ROLL_NS));
            c.push(MatroskaSpec::Audio(Master::Full(vec![
                MatroskaSpec::SamplingFrequency(48_000.0),
                MatroskaSpec::Channels(t.channels.max(1) as u64),
            ])));
        }
        video => {
            c.push(MatroskaSpec::TrackType(1));
            c.push(MatroskaSpec::CodecID(
                match video {
                    Codec::Vp8 => "V_VP8",
                    Codec::Vp9 => "V_VP9",
                    _ => "V_MPEG4/ISO/AVC",
                }
                .into(),
            ));
            if let Some(p) = &t.codec_private {
                c.push(MatroskaSpec::CodecPrivate(p.clone()));
            }
            c.push(MatroskaSpec::Video(Master::Full(vec![
                MatroskaSpec::PixelWidth(t.size.0.max(1) as u64),
                MatroskaSpec::PixelHeight(t.size.1.max(1) as u64),
            ])));
        }
    }
    MatroskaSpec::TrackEntry(Master::Full(c))
}

impl MediaFile {
    /// Creates the file (never replacing one) and writes its header.
    pub fn create(
        path: &Path,
        tracks: Vec<TrackSpec>,
        started: SystemTime,
        title: &str,
    ) -> Result<MediaFile, MediaFileError> {
        let io = |source| MediaFileError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io)?;
        let mut w = WebmWriter::new(Sink {
            file: BufWriter::with_capacity(256 << 10, file),
            written: 0,
            head: Vec::new(),
        });
        let doc_type = if extension(&tracks) == "webm" {
            "webm"
        } else {
            "matroska"
        };
        w.write(&MatroskaSpec::Ebml(Master::Full(vec![
            MatroskaSpec::EbmlVersion(1),
            MatroskaSpec::EbmlReadVersion(1),
            MatroskaSpec::EbmlMaxIdLength(4),
            MatroskaSpec::EbmlMaxSizeLength(8),
            MatroskaSpec::DocType(doc_type.into()),
            MatroskaSpec::DocTypeVersion(4),
            MatroskaSpec::DocTypeReadVersion(2),
        ])))
        .map_err(|e| ebml_err(path, e))?;
        let segment_size_at = w.get_ref().written + 4;
        let segment_data_at = segment_size_at + 8;
        w.write_advanced(
            &MatroskaSpec::Segment(Master::Start),
            webm_iterable::WriteOptions::is_unknown_sized_element(),
        )
        .map_err(|e| ebml_err(path, e))?;
        let since = started
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as i64
            - (MATROSKA_EPOCH as i64) * 1_000_000_000;
        let app = concat!("meridian ", env!("CARGO_PKG_VERSION"));
        w.write(&MatroskaSpec::Info(Master::Full(vec![
            MatroskaSpec::Void(vec![0; DURATION_ROOM - 2]),
            MatroskaSpec::TimestampScale(1_000_000),
            MatroskaSpec::MuxingApp(app.into()),
            MatroskaSpec::WritingApp(app.into()),
            MatroskaSpec::DateUTC(since),
            MatroskaSpec::Title(title.into()),
        ])))
        .map_err(|e| ebml_err(path, e))?;
        w.write(&MatroskaSpec::Tracks(Master::Full(
            tracks.iter().map(track_entry).collect(),
        )))
        .map_err(|e| ebml_err(path, e))?;
        // (The writer's `flush` would close the segment: the header went out with the tracks,
        // the only element open being the segment, of unknown size.)
        let mut void = vec![0xec, 0x80 | (DURATION_ROOM - 2) as u8];
        void.extend_from_slice(&[0; DURATION_ROOM - 2]);
        let head = &w.get_ref().head;
        let duration_at = head
            .windows(void.len())
            .position(|x| x == void)
            .ok_or_else(|| ebml_err(path, "the header's room for the duration is missing"))?
            as u64;
        Ok(MediaFile {
            path: path.to_path_buf(),
            w,
            track_last: vec![None; tracks.len()],
            tracks,
            segment_size_at,
            segment_data_at,
            duration_at,
            cluster: None,
            last_ms: 0,
            frames: 0,
            unsynced: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tracks(&self) -> &[TrackSpec] {
        &self.tracks
    }

    /// One frame at `ms` on the session clock. A frame earlier than the last one written
    /// is moved up to it (a block may not go back in time), and a track's frames keep
    /// distinct times (players order them by time).
    pub fn write(
        &mut self,
        track: u64,
        ms: u64,
        keyframe: bool,
        data: &[u8],
    ) -> Result<(), MediaFileError> {
        let i = self
            .tracks
            .iter()
            .position(|t| t.number == track)
            .ok_or(MediaFileError::UnknownTrack(track))?;
        let video = self.tracks[i].codec.is_video();
        let ms = ms
            .max(self.last_ms)
            .max(self.track_last[i].map_or(0, |l| l + 1));
        self.track_last[i] = Some(ms);
        let cut = match self.cluster {
            None => true,
            Some(start) => ms - start >= CLUSTER_MS || (video && keyframe && ms > start),
        };
        if cut {
            self.close_cluster()?;
            self.w
                .write(&MatroskaSpec::Cluster(Master::Start))
                .and_then(|_| self.w.write(&MatroskaSpec::Timestamp(ms)))
                .map_err(|e| ebml_err(&self.path, e))?;
            self.cluster = Some(ms);
        }
        let rel = (ms - self.cluster.unwrap_or(ms)) as i16;
        let block = SimpleBlock::new_uncheked(data, track, rel, false, None, false, keyframe);
        self.w
            .write(&MatroskaSpec::from(block))
            .map_err(|e| ebml_err(&self.path, e))?;
        self.last_ms = ms;
        self.frames += 1;
        Ok(())
    }

    /// Ends the open cluster: it goes to the file whole.
    fn close_cluster(&mut self) -> Result<(), MediaFileError> {
        if self.cluster.take().is_some() {
            self.w
                .write(&MatroskaSpec::Cluster(Master::End))
                .map_err(|e| ebml_err(&self.path, e))?;
            self.unsynced.get_or_insert_with(std::time::Instant::now);
        }
        Ok(())
    }

    /// Since when whole clusters wait to be synced to disk.
    pub fn unsynced_since(&self) -> Option<std::time::Instant> {
        self.unsynced
    }

    /// Everything written so far reaches the disk (a cut file plays up to here).
    pub fn sync(&mut self) -> Result<(), MediaFileError> {
        self.unsynced = None;
        let sink = self.w.get_mut();
        sink.file
            .flush()
            .and_then(|_| sink.file.get_ref().sync_data())
            .map_err(|source| MediaFileError::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// Writes the last cluster, the duration and the segment's size, and syncs the file.
    pub fn finish(mut self) -> Result<FileSummary, MediaFileError> {
        self.close_cluster()?;
        let path = self.path.clone();
        let io = |source| MediaFileError::Io {
            path: path.clone(),
            source,
        };
        // The segment stays open in the writer: its size is written in place below.
        let sink = self.w.get_mut();
        sink.file.flush().map_err(io)?;
        let total = sink.written;
        let file = sink.file.get_mut();
        let duration = self.last_ms as f64;
        let mut d = vec![0x44, 0x89, 0x88];
        d.extend_from_slice(&duration.to_be_bytes());
        let mut size = (total - self.segment_data_at).to_be_bytes();
        size[0] = 0x01; // an 8-byte size (the data is far below 2^56 bytes)
        file.seek(SeekFrom::Start(self.duration_at))
            .and_then(|_| file.write_all(&d))
            .and_then(|_| file.seek(SeekFrom::Start(self.segment_size_at)))
            .and_then(|_| file.write_all(&size))
            .and_then(|_| file.seek(SeekFrom::End(0)))
            .and_then(|_| file.sync_all())
            .map_err(io)?;
        Ok(FileSummary {
            bytes: total,
            duration_ms: self.last_ms,
            frames: self.frames,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use webm_iterable::WebmIterator;

    fn tracks() -> Vec<TrackSpec> {
        vec![
            TrackSpec {
                number: 1,
                codec: Codec::Vp8,
                name: "video".into(),
                size: (320, 180),
                channels: 0,
                codec_private: None,
            },
            TrackSpec {
                number: 2,
                codec: Codec::Opus,
                name: "audio".into(),
                size: (0, 0),
                channels: 2,
                codec_private: None,
            },
        ]
    }

    #[test]
    fn a_finished_file_reads_back_with_its_tracks_clusters_blocks_and_duration() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.webm");
        let mut f = MediaFile::create(&path, tracks(), SystemTime::now(), "t").unwrap();
        for i in 0..150u64 {
            f.write(2, i * 20, true, &[0xfc, i as u8]).unwrap();
            if i % 2 == 0 {
                f.write(1, i * 20, i % 100 == 0, &[1, 2, 3]).unwrap();
            }
        }
        let summary = f.finish().unwrap();
        assert_eq!(summary.duration_ms, 2980);
        assert_eq!(summary.frames, 225);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, summary.bytes);
        let tags: Vec<MatroskaSpec> = WebmIterator::new(std::io::Cursor::new(bytes), &[])
            .map(|t| t.unwrap())
            .collect();
        let count = |f: &dyn Fn(&MatroskaSpec) -> bool| tags.iter().filter(|t| f(t)).count();
        assert_eq!(count(&|t| matches!(t, MatroskaSpec::SimpleBlock(_))), 225);
        assert_eq!(
            count(&|t| matches!(t, MatroskaSpec::TrackEntry(Master::Start))),
            2
        );
        assert!(count(&|t| matches!(t, MatroskaSpec::Cluster(Master::End))) >= 3);
        assert!(tags.contains(&MatroskaSpec::Duration(2980.0)));
        assert!(tags.contains(&MatroskaSpec::DocType("webm".into())));
    }

    #[test]
    fn a_file_cut_mid_cluster_still_reads_up_to_its_last_whole_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cut.webm");
        let mut f = MediaFile::create(&path, tracks(), SystemTime::now(), "t").unwrap();
        for i in 0..120u64 {
            f.write(2, i * 20, true, &[0xfc, i as u8]).unwrap();
        }
        f.sync().unwrap();
        // Dropped without finishing, as a killed process leaves it.
        drop(f);
        let bytes = std::fs::read(&path).unwrap();
        let blocks = WebmIterator::new(std::io::Cursor::new(bytes), &[])
            .map_while(|t| t.ok())
            .filter(|t| matches!(t, MatroskaSpec::SimpleBlock(_)))
            .count();
        // Two whole clusters of 50 blocks each made it; the open third did not.
        assert_eq!(blocks, 100);
    }

    #[test]
    fn frames_never_go_back_in_time_and_a_tracks_frames_keep_distinct_times() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.webm");
        let mut f = MediaFile::create(&path, tracks(), SystemTime::now(), "t").unwrap();
        f.write(1, 100, true, &[1]).unwrap();
        f.write(2, 90, true, &[2]).unwrap(); // late: moved up to 100
        f.write(2, 95, true, &[3]).unwrap(); // and after its own 100
        f.write(1, 100, false, &[4]).unwrap();
        assert_eq!(f.finish().unwrap().duration_ms, 101);
        let times: Vec<(u64, i16)> = WebmIterator::new(std::fs::File::open(&path).unwrap(), &[])
            .map(|t| t.unwrap())
            .filter_map(|t| match &t {
                MatroskaSpec::SimpleBlock(_) => {
                    let b = SimpleBlock::try_from(&t).unwrap();
                    Some((b.track, b.timestamp))
                }
                _ => None,
            })
            .collect();
        assert_eq!(times, [(1, 0), (2, 0), (2, 1), (1, 1)]);
    }

    #[test]
    fn h264_goes_in_matroska_and_the_rest_in_webm() {
        let mut t = tracks();
        assert_eq!(extension(&t), "webm");
        t[0].codec = Codec::H264;
        assert_eq!(extension(&t), "mkv");
    }
}
