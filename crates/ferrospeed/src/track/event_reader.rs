//! Test-only reader of TensorBoard event files, written independently of the writer's encoder so the two
//! check each other: it verifies both CRCs of every record and decodes the protobuf by field number.

use super::tensorboard::masked_crc32c;
use std::path::Path;

/// The fields of one decoded `Event`.
#[derive(Debug)]
pub(super) struct DecodedEvent {
    pub wall_time: f64,
    pub step: u64,
    pub file_version: Option<String>,
    /// (tag, simple_value) in file order.
    pub values: Vec<(String, f32)>,
}

/// Reads every record of an event file, panicking (this is a test helper) on any framing or CRC error.
pub(super) fn read_events(path: &Path) -> Vec<DecodedEvent> {
    let bytes = std::fs::read(path).expect("read event file");
    let mut events = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        assert!(bytes.len() - pos >= 12, "truncated record header at byte {pos}");
        let len_bytes = &bytes[pos..pos + 8];
        let len_crc = u32::from_le_bytes(bytes[pos + 8..pos + 12].try_into().unwrap());
        assert_eq!(len_crc, masked_crc32c(len_bytes), "length CRC at byte {pos}");
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let data_start = pos + 12;
        assert!(bytes.len() >= data_start + len + 4, "truncated record at byte {pos}");
        let data = &bytes[data_start..data_start + len];
        let data_crc = u32::from_le_bytes(bytes[data_start + len..data_start + len + 4].try_into().unwrap());
        assert_eq!(data_crc, masked_crc32c(data), "data CRC at byte {pos}");
        events.push(decode_event(data));
        pos = data_start + len + 4;
    }
    events
}

/// One protobuf field: its number and payload.
enum Field<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Fixed32([u8; 4]),
    Bytes(&'a [u8]),
}

fn fields(mut msg: &[u8]) -> Vec<(u64, Field<'_>)> {
    let mut out = Vec::new();
    while !msg.is_empty() {
        let key = take_varint(&mut msg);
        let field = match key & 7 {
            0 => Field::Varint(take_varint(&mut msg)),
            1 => {
                let (head, rest) = msg.split_at(8);
                msg = rest;
                Field::Fixed64(head.try_into().unwrap())
            }
            2 => {
                let len = take_varint(&mut msg) as usize;
                let (head, rest) = msg.split_at(len);
                msg = rest;
                Field::Bytes(head)
            }
            5 => {
                let (head, rest) = msg.split_at(4);
                msg = rest;
                Field::Fixed32(head.try_into().unwrap())
            }
            other => panic!("unexpected wire type {other}"),
        };
        out.push((key >> 3, field));
    }
    out
}

fn take_varint(msg: &mut &[u8]) -> u64 {
    let mut value = 0u64;
    let mut shift = 0;
    loop {
        let (&byte, rest) = msg.split_first().expect("truncated varint");
        *msg = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return value;
        }
        shift += 7;
    }
}

fn decode_event(data: &[u8]) -> DecodedEvent {
    let mut event = DecodedEvent { wall_time: 0.0, step: 0, file_version: None, values: Vec::new() };
    for (number, field) in fields(data) {
        match (number, field) {
            (1, Field::Fixed64(b)) => event.wall_time = f64::from_le_bytes(b),
            (2, Field::Varint(v)) => event.step = v,
            (3, Field::Bytes(b)) => event.file_version = Some(String::from_utf8(b.to_vec()).unwrap()),
            (5, Field::Bytes(summary)) => {
                for (n, value) in fields(summary) {
                    let (1, Field::Bytes(value)) = (n, value) else { panic!("Summary field {n}") };
                    let (mut tag, mut simple) = (None, None);
                    for (vn, vf) in fields(value) {
                        match (vn, vf) {
                            (1, Field::Bytes(b)) => tag = Some(String::from_utf8(b.to_vec()).unwrap()),
                            (2, Field::Fixed32(b)) => simple = Some(f32::from_le_bytes(b)),
                            (other, _) => panic!("unexpected Value field {other}"),
                        }
                    }
                    event.values.push((tag.expect("Value.tag"), simple.expect("Value.simple_value")));
                }
            }
            (other, _) => panic!("unexpected Event field {other}"),
        }
    }
    event
}
