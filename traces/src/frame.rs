//! The fixed binary layouts: file header prefix, frame header, trailer. Everything is little
//! endian and fixed size so a reader can parse it before trusting anything.

use crate::types::Position;
use serde::{Deserialize, Serialize};

/// Magic at the start of every frame header.
pub(crate) const FRAME_MAGIC: [u8; 4] = *b"DJFR";
/// Bytes in a frame header.
pub const FRAME_HEADER_LEN: usize = 68;
/// Bytes in the trailer.
pub const TRAILER_LEN: usize = 24;
/// Bytes before the encoded header: magic, version, header length.
pub(crate) const FILE_PREFIX_LEN: usize = 16;
/// Largest compressed payload accepted: zstd's worst case for [`crate::MAX_FRAME_PAYLOAD`].
pub(crate) const MAX_COMPRESSED_PAYLOAD: usize =
    crate::MAX_FRAME_PAYLOAD + crate::MAX_FRAME_PAYLOAD / 128 + (64 << 10);
/// Bytes of one stored page: page number plus contents.
pub(crate) const PAGE_ITEM_LEN: usize = 8 + crate::PAGE_SIZE;

/// What a frame holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum FrameKind {
    /// bincode events.
    Events,
    /// Raw memory pages of the checkpoint being written.
    CheckpointPages,
    /// A checkpoint's metadata; commits the page frames right before it.
    Checkpoint,
    /// The footer.
    Footer,
    /// Format 8 ([`crate::EMBEDDED_IMAGES_FORMAT`]): a run of an image's bytes, embedded so
    /// that a replay needs no file (`deja record --embed-images`). `items` is the image's
    /// index in [`crate::Header::images`]; its frames, in order, hold its bytes.
    Image,
}

impl FrameKind {
    /// The byte stored in the frame header.
    pub fn to_byte(self) -> u8 {
        match self {
            FrameKind::Events => 1,
            FrameKind::CheckpointPages => 2,
            FrameKind::Checkpoint => 3,
            FrameKind::Footer => 4,
            FrameKind::Image => 5,
        }
    }

    /// The kind a stored byte names, if any.
    pub fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            1 => FrameKind::Events,
            2 => FrameKind::CheckpointPages,
            3 => FrameKind::Checkpoint,
            4 => FrameKind::Footer,
            5 => FrameKind::Image,
            _ => return None,
        })
    }

    /// A short name for messages and stats.
    pub fn name(self) -> &'static str {
        match self {
            FrameKind::Events => "events",
            FrameKind::CheckpointPages => "checkpoint-pages",
            FrameKind::Checkpoint => "checkpoint",
            FrameKind::Footer => "footer",
            FrameKind::Image => "image",
        }
    }
}

/// The fixed header in front of every frame payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// What the payload holds.
    pub kind: FrameKind,
    /// Sequence number: 0 for the first frame, one more for each after it.
    pub seq: u64,
    /// Position of the first item.
    pub first: Position,
    /// Position of the last item.
    pub last: Position,
    /// Items in the payload.
    pub items: u32,
    /// Payload bytes after decompression.
    pub uncompressed_len: u32,
    /// Payload bytes in the file.
    pub compressed_len: u32,
    /// BLAKE3 prefix of the header's first 60 bytes and the compressed payload.
    pub checksum: u64,
}

/// Why 68 bytes are not a frame header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HeaderProblem {
    Magic([u8; 4]),
    Kind(u8),
    Reserved([u8; 3]),
    Uncompressed(u32),
    Compressed(u32),
    Positions(Position, Position),
    PageItems { items: u32, len: u32 },
}

impl std::fmt::Display for HeaderProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderProblem::Magic(m) => write!(f, "bad frame magic {m:02x?} (expected \"DJFR\")"),
            HeaderProblem::Kind(k) => write!(f, "unknown frame kind {k}"),
            HeaderProblem::Reserved(r) => write!(f, "reserved header bytes are {r:02x?}, not zero"),
            HeaderProblem::Uncompressed(n) => write!(
                f,
                "uncompressed length {n} exceeds the limit {}",
                crate::MAX_FRAME_PAYLOAD
            ),
            HeaderProblem::Compressed(n) => write!(
                f,
                "compressed length {n} exceeds the limit {MAX_COMPRESSED_PAYLOAD}"
            ),
            HeaderProblem::Positions(a, b) => {
                write!(f, "first position ({a}) is after last position ({b})")
            }
            HeaderProblem::PageItems { items, len } => write!(
                f,
                "{items} pages need {} bytes but the payload holds {len}",
                *items as u64 * PAGE_ITEM_LEN as u64
            ),
        }
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

impl FrameHeader {
    /// The header's bytes with the checksum field left zero.
    fn encode_unsummed(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut b = [0u8; FRAME_HEADER_LEN];
        b[0..4].copy_from_slice(&FRAME_MAGIC);
        b[4] = self.kind.to_byte();
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.first.icount.to_le_bytes());
        b[24..32].copy_from_slice(&self.first.exits.to_le_bytes());
        b[32..40].copy_from_slice(&self.last.icount.to_le_bytes());
        b[40..48].copy_from_slice(&self.last.exits.to_le_bytes());
        b[48..52].copy_from_slice(&self.items.to_le_bytes());
        b[52..56].copy_from_slice(&self.uncompressed_len.to_le_bytes());
        b[56..60].copy_from_slice(&self.compressed_len.to_le_bytes());
        b
    }

    /// The checksum this header with `payload` must carry.
    pub(crate) fn compute_checksum(&self, payload: &[u8]) -> u64 {
        let b = self.encode_unsummed();
        crate::checksum64(&[&b[..60], payload])
    }

    /// Encodes the header (including `self.checksum`).
    pub(crate) fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut b = self.encode_unsummed();
        b[60..68].copy_from_slice(&self.checksum.to_le_bytes());
        b
    }

    /// Parses and sanity-checks a header; lengths are capped here, before anyone allocates.
    pub(crate) fn decode(b: &[u8; FRAME_HEADER_LEN]) -> Result<Self, HeaderProblem> {
        let mut magic = [0u8; 4];
        magic.copy_from_slice(&b[0..4]);
        if magic != FRAME_MAGIC {
            return Err(HeaderProblem::Magic(magic));
        }
        let kind = FrameKind::from_byte(b[4]).ok_or(HeaderProblem::Kind(b[4]))?;
        if b[5..8] != [0, 0, 0] {
            return Err(HeaderProblem::Reserved([b[5], b[6], b[7]]));
        }
        let h = FrameHeader {
            kind,
            seq: u64_at(b, 8),
            first: Position::new(u64_at(b, 16), u64_at(b, 24)),
            last: Position::new(u64_at(b, 32), u64_at(b, 40)),
            items: u32_at(b, 48),
            uncompressed_len: u32_at(b, 52),
            compressed_len: u32_at(b, 56),
            checksum: u64_at(b, 60),
        };
        if h.uncompressed_len as usize > crate::MAX_FRAME_PAYLOAD {
            return Err(HeaderProblem::Uncompressed(h.uncompressed_len));
        }
        if h.compressed_len as usize > MAX_COMPRESSED_PAYLOAD {
            return Err(HeaderProblem::Compressed(h.compressed_len));
        }
        if !h.first.at_or_before(&h.last) {
            return Err(HeaderProblem::Positions(h.first, h.last));
        }
        if kind == FrameKind::CheckpointPages
            && h.items as u64 * PAGE_ITEM_LEN as u64 != h.uncompressed_len as u64
        {
            return Err(HeaderProblem::PageItems {
                items: h.items,
                len: h.uncompressed_len,
            });
        }
        Ok(h)
    }

    /// Total bytes of the frame in the file.
    pub fn frame_len(&self) -> u64 {
        FRAME_HEADER_LEN as u64 + self.compressed_len as u64
    }
}

/// Encodes the trailer pointing at the footer frame.
pub(crate) fn encode_trailer(footer_offset: u64) -> [u8; TRAILER_LEN] {
    let mut b = [0u8; TRAILER_LEN];
    b[0..8].copy_from_slice(&footer_offset.to_le_bytes());
    let sum = crate::checksum64(&[&b[0..8]]);
    b[8..16].copy_from_slice(&sum.to_le_bytes());
    b[16..24].copy_from_slice(&crate::TRAILER_MAGIC);
    b
}

/// The footer offset a trailer names, if it is a valid trailer.
pub(crate) fn decode_trailer(b: &[u8; TRAILER_LEN]) -> Option<u64> {
    if b[16..24] != crate::TRAILER_MAGIC {
        return None;
    }
    let offset = u64_at(b, 0);
    if u64_at(b, 8) != crate::checksum64(&[&b[0..8]]) {
        return None;
    }
    Some(offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_header_round_trips_and_checksum_covers_every_field() {
        let h = FrameHeader {
            kind: FrameKind::Events,
            seq: 7,
            first: Position::new(1, 2),
            last: Position::new(3, 4),
            items: 5,
            uncompressed_len: 600,
            compressed_len: 70,
            checksum: 0,
        };
        let payload = [1u8, 2, 3];
        let h = FrameHeader {
            checksum: h.compute_checksum(&payload),
            ..h
        };
        let bytes = h.encode();
        assert_eq!(FrameHeader::decode(&bytes), Ok(h));
        for byte in 0..60 {
            let mut flipped = bytes;
            flipped[byte] ^= 1;
            if let Ok(g) = FrameHeader::decode(&flipped) {
                assert_ne!(g.compute_checksum(&payload), g.checksum, "byte {byte}");
            }
        }
    }

    #[test]
    fn header_lengths_are_capped_before_allocation() {
        let h = FrameHeader {
            kind: FrameKind::Events,
            seq: 0,
            first: Position::default(),
            last: Position::default(),
            items: 1,
            uncompressed_len: u32::MAX,
            compressed_len: 1,
            checksum: 0,
        };
        assert_eq!(
            FrameHeader::decode(&h.encode()),
            Err(HeaderProblem::Uncompressed(u32::MAX))
        );
    }

    #[test]
    fn trailer_round_trips_and_rejects_flips() {
        let t = encode_trailer(0x1234_5678);
        assert_eq!(decode_trailer(&t), Some(0x1234_5678));
        let mut bad = t;
        bad[2] ^= 0x40;
        assert_eq!(decode_trailer(&bad), None);
    }
}
