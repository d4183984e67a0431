//! [`TensorBoardWriter`]: writes TensorBoard event files (TFRecord framing, hand-encoded protobuf).
//!
//! Scalars are all we log, and their wire format is small and frozen, so a hundred lines here replace a
//! protobuf toolchain and a TensorBoard crate. The file layout:
//!
//! - file: `events.out.tfevents.<unix_seconds>.<hostname>`, a sequence of TFRecords;
//! - record: `u64 LE length`, `u32 LE masked crc32c(length bytes)`, `data`, `u32 LE masked crc32c(data)`;
//! - data: `Event { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }`
//!   with `Summary { repeated Value value = 1; }` and `Value { string tag = 1; float simple_value = 2; }`.

use super::TrackError;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The version string TensorBoard expects in the first event of a file.
const FILE_VERSION: &str = "brain.Event:2";

/// Protobuf wire types used by the fields above.
const WIRE_VARINT: u8 = 0;
const WIRE_FIXED64: u8 = 1;
const WIRE_LEN: u8 = 2;
const WIRE_FIXED32: u8 = 5;

/// Appends scalar summaries to one TensorBoard event file.
pub struct TensorBoardWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl TensorBoardWriter {
    /// Creates a new event file in `dir` (which must exist) and writes the file-version event.
    ///
    /// Never truncates an existing file: if the conventional name is taken (two writers started in the
    /// same second), a numeric suffix is added; TensorBoard reads every file whose name contains "tfevents".
    pub fn create(dir: &Path) -> Result<Self, TrackError> {
        let base = format!("events.out.tfevents.{}.{}", unix_seconds(), hostname());
        let mut attempt = 0u32;
        let (path, file) = loop {
            let name = if attempt == 0 { base.clone() } else { format!("{base}.{attempt}") };
            let path = dir.join(name);
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => break (path, file),
                Err(e) if e.kind() == ErrorKind::AlreadyExists && attempt < 1000 => attempt += 1,
                Err(source) => return Err(TrackError::CreateFile { path, source }),
            }
        };
        let mut writer = Self { path, out: BufWriter::new(file) };
        let mut event = Vec::new();
        encode_event_header(&mut event, wall_time(), 0);
        put_len_delimited(&mut event, 3, FILE_VERSION.as_bytes());
        writer.write_record(&event)?;
        writer.flush()?;
        Ok(writer)
    }

    /// Path of the event file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one event at `step` holding all `scalars` (tag, value) in one summary.
    /// Values are stored as f32, as TensorBoard's `simple_value` is a float.
    pub fn add_scalars(&mut self, step: u64, scalars: &[(&str, f64)]) -> Result<(), TrackError> {
        let mut summary = Vec::new();
        for (tag, value) in scalars {
            let mut value_msg = Vec::with_capacity(tag.len() + 8);
            put_len_delimited(&mut value_msg, 1, tag.as_bytes());
            put_tag(&mut value_msg, 2, WIRE_FIXED32);
            value_msg.extend_from_slice(&(*value as f32).to_le_bytes());
            put_len_delimited(&mut summary, 1, &value_msg);
        }
        let mut event = Vec::with_capacity(summary.len() + 24);
        encode_event_header(&mut event, wall_time(), step);
        put_len_delimited(&mut event, 5, &summary);
        self.write_record(&event)
    }

    /// Pushes buffered events to the operating system so TensorBoard (or a crash) sees them.
    pub fn flush(&mut self) -> Result<(), TrackError> {
        self.out.flush().map_err(|source| TrackError::Write { path: self.path.clone(), source })
    }

    fn write_record(&mut self, data: &[u8]) -> Result<(), TrackError> {
        let record = frame_record(data);
        self.out.write_all(&record).map_err(|source| TrackError::Write { path: self.path.clone(), source })
    }
}

/// Wraps `data` in TFRecord framing: length, masked CRC of the length, data, masked CRC of the data.
fn frame_record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut record = Vec::with_capacity(data.len() + 16);
    record.extend_from_slice(&len);
    record.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    record.extend_from_slice(data);
    record.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    record
}

/// TFRecord's masked CRC32C. Masking exists because a CRC of data that itself contains CRCs is weak.
pub(super) fn masked_crc32c(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    ((crc >> 15) | (crc << 17)).wrapping_add(0xa282_ead8)
}

/// Writes Event fields 1 (wall_time) and 2 (step).
fn encode_event_header(buf: &mut Vec<u8>, wall_time: f64, step: u64) {
    put_tag(buf, 1, WIRE_FIXED64);
    buf.extend_from_slice(&wall_time.to_le_bytes());
    put_tag(buf, 2, WIRE_VARINT);
    // int64 on the wire is the two's-complement bits as a varint, which for a u64 is the u64 itself.
    put_varint(buf, step);
}

fn put_tag(buf: &mut Vec<u8>, field: u32, wire_type: u8) {
    put_varint(buf, (u64::from(field) << 3) | u64::from(wire_type));
}

fn put_len_delimited(buf: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_tag(buf, field, WIRE_LEN);
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn wall_time() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn unix_seconds() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The machine's name for the file name, without a crate: Linux exposes it under /proc, other systems
/// usually in the environment. Characters unsafe in a file name are replaced.
fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .unwrap_or_default();
    let cleaned: String = raw
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' { c } else { '_' })
        .collect();
    if cleaned.is_empty() {
        "localhost".to_string()
    } else {
        cleaned
    }
}

#[cfg(test)]
mod tests {
    use super::super::event_reader::read_events;
    use super::*;

    #[test]
    fn masked_crc32c_matches_known_vector() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        let crc: u32 = 0xE306_9283;
        let expect = ((crc >> 15) | (crc << 17)).wrapping_add(0xa282_ead8);
        assert_eq!(masked_crc32c(b"123456789"), expect);
        // Worked by hand: rotr(0xE3069283, 15) = 0x2507C60D; + 0xA282EAD8 = 0xC78AB0E5.
        assert_eq!(masked_crc32c(b"123456789"), 0xC78A_B0E5);
    }

    #[test]
    fn varint_encoding() {
        for (v, expect) in [(0u64, vec![0u8]), (1, vec![1]), (127, vec![0x7f]), (300, vec![0xac, 0x02])] {
            let mut buf = Vec::new();
            put_varint(&mut buf, v);
            assert_eq!(buf, expect, "varint of {v}");
        }
    }

    #[test]
    fn written_scalars_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut tb = TensorBoardWriter::create(dir.path()).unwrap();
        tb.add_scalars(1, &[("loss", 4.5), ("lr", 3e-3)]).unwrap();
        tb.add_scalars(2, &[("loss", 4.25), ("lr", 2.5e-3)]).unwrap();
        tb.add_scalars(300, &[("loss", 1.0)]).unwrap();
        tb.flush().unwrap();

        let name = tb.path().file_name().unwrap().to_str().unwrap().to_string();
        assert!(name.starts_with("events.out.tfevents."), "{name}");

        let events = read_events(tb.path());
        assert_eq!(events.len(), 4);
        assert_eq!(events[0].file_version.as_deref(), Some(FILE_VERSION));
        assert!(events[0].values.is_empty());
        assert!(events[0].wall_time > 1.0e9, "wall time is seconds since the epoch");

        assert_eq!(events[1].step, 1);
        assert_eq!(events[1].values, vec![("loss".to_string(), 4.5f32), ("lr".to_string(), 3e-3f32)]);
        assert_eq!(events[2].step, 2);
        assert_eq!(events[2].values, vec![("loss".to_string(), 4.25f32), ("lr".to_string(), 2.5e-3f32)]);
        assert_eq!(events[3].step, 300);
        assert_eq!(events[3].values, vec![("loss".to_string(), 1.0f32)]);
        assert!(events[1..].iter().all(|e| e.file_version.is_none()));
    }

    #[test]
    fn second_writer_in_same_directory_does_not_clobber_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = TensorBoardWriter::create(dir.path()).unwrap();
        first.add_scalars(7, &[("loss", 2.0)]).unwrap();
        first.flush().unwrap();
        let second = TensorBoardWriter::create(dir.path()).unwrap();
        assert_ne!(first.path(), second.path());
        assert_eq!(read_events(first.path()).len(), 2);
    }
}
