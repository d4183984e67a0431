//! The header every collective message starts with, so ranks that diverge are caught, not corrupted.

use super::buffer::DType;
use super::OpKind;
use std::io::{self, Read};

const MAGIC: u32 = 0xFE55_D001;
/// Encoded size of a [`Header`].
pub(crate) const HEADER_LEN: usize = 24;

/// Identifies one message of one collective.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub seq: u64,
    pub op: OpKind,
    /// Step within the collective (broadcast scatters, then gathers).
    pub phase: u8,
    pub dtype: Option<DType>,
    /// Elements in the payload that follows.
    pub numel: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..12].copy_from_slice(&self.seq.to_le_bytes());
        b[12] = self.op as u8;
        b[13] = self.phase;
        b[14] = self.dtype.map_or(0, |d| d as u8);
        b[16..24].copy_from_slice(&self.numel.to_le_bytes());
        b
    }

    /// Read a header; `Err(InvalidData)` if the bytes are not one.
    pub fn read(r: &mut impl Read) -> io::Result<Self> {
        let mut b = [0u8; HEADER_LEN];
        r.read_exact(&mut b)?;
        let invalid = || io::Error::new(io::ErrorKind::InvalidData, "stream is not a ferrospeed collective message");
        if u32::from_le_bytes(b[0..4].try_into().expect("4 bytes")) != MAGIC {
            return Err(invalid());
        }
        Ok(Self {
            seq: u64::from_le_bytes(b[4..12].try_into().expect("8 bytes")),
            op: OpKind::from_u8(b[12]).ok_or_else(invalid)?,
            phase: b[13],
            dtype: if b[14] == 0 { None } else { Some(DType::from_u8(b[14]).ok_or_else(invalid)?) },
            numel: u64::from_le_bytes(b[16..24].try_into().expect("8 bytes")),
        })
    }

    /// How users see it in a desync error, e.g. `all_gather #7 (bf16×512)`.
    pub fn describe(&self) -> String {
        match self.dtype {
            Some(d) => format!("{} #{} ({d}×{})", self.op, self.seq, self.numel),
            None => format!("{} #{}", self.op, self.seq),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects_garbage() {
        let h = Header { seq: 42, op: OpKind::Broadcast, phase: 1, dtype: Some(DType::F16), numel: 1 << 40 };
        assert_eq!(Header::read(&mut &h.encode()[..]).unwrap(), h);
        let mut bad = h.encode();
        bad[0] ^= 1;
        assert_eq!(Header::read(&mut &bad[..]).unwrap_err().kind(), io::ErrorKind::InvalidData);
    }
}
