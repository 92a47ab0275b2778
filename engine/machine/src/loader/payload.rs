//! A bzImage's payload: the compressed `vmlinux` ELF its decompressor would unpack. The
//! setup header says where it is (`payload_offset`, from the protected-mode kernel's
//! start, and `payload_length`, boot protocol 2.08+); its first bytes say how it is
//! compressed. Decompressing it here is what lets `--kernel-entry pvh` boot a stock
//! bzImage without running the decompressor, which is most of an early boot's
//! instructions.
//!
//! Linux appends the uncompressed size as 4 bytes after an xz, zstd or lz4 stream; the
//! decoders here read one stream and ignore what follows it. The ELF itself may be
//! followed by the kernel's relocation table (`vmlinux.relocs`), which ELF parsing ignores.

use super::LoadError;
use super::linux::parse_header;
use std::io::Read;

/// How a payload is compressed, told by its magic bytes (as Linux's `CONFIG_KERNEL_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Not compressed (`CONFIG_KERNEL_UNCOMPRESSED`): the payload is the ELF.
    None,
    /// gzip (`1f 8b`).
    Gzip,
    /// xz (`fd 37 7a 58 5a 00`), Debian's choice.
    Xz,
    /// zstd (`28 b5 2f fd`).
    Zstd,
    /// bzip2 (`BZh`): not decompressed by deja.
    Bzip2,
    /// The legacy lzma format (`5d 00 00`): not decompressed by deja.
    Lzma,
    /// lzop (`89 4c 5a 4f`): not decompressed by deja.
    Lzo,
    /// lz4's legacy frame (`02 21 4c 18`, `lz4 -l`).
    Lz4,
}

impl Compression {
    /// The compression whose magic `payload` starts with, if any.
    pub fn detect(payload: &[u8]) -> Option<Self> {
        const MAGICS: [(&[u8], Compression); 8] = [
            (b"\x7fELF", Compression::None),
            (&[0x1f, 0x8b], Compression::Gzip),
            (&[0xfd, b'7', b'z', b'X', b'Z', 0], Compression::Xz),
            (&[0x28, 0xb5, 0x2f, 0xfd], Compression::Zstd),
            (b"BZh", Compression::Bzip2),
            (&[0x5d, 0, 0], Compression::Lzma),
            (&[0x89, b'L', b'Z', b'O'], Compression::Lzo),
            (&[0x02, 0x21, 0x4c, 0x18], Compression::Lz4),
        ];
        MAGICS
            .iter()
            .find(|(magic, _)| payload.starts_with(magic))
            .map(|&(_, c)| c)
    }

    /// Its name, as Linux's Kconfig spells it.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "uncompressed",
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Bzip2 => "bzip2",
            Compression::Lzma => "lzma",
            Compression::Lzo => "lzo",
            Compression::Lz4 => "lz4",
        }
    }
}

/// The payload bytes of bzImage `name`, checked to lie inside the file.
pub fn payload<'a>(name: &str, bytes: &'a [u8]) -> Result<&'a [u8], LoadError> {
    let h = parse_header(name, bytes)?;
    let (offset, length) = (u64::from(h.payload_offset), u64::from(h.payload_length));
    let start = h.kernel_offset as u64 + offset;
    let end = start + length;
    if length == 0 || end > bytes.len() as u64 {
        return Err(LoadError::BzImage {
            name: name.to_string(),
            problem: format!(
                "the setup header's payload (payload_offset {offset:#x} past the kernel at \
                 {:#x}, payload_length {length:#x}) is not inside the {}-byte file",
                h.kernel_offset,
                bytes.len()
            ),
        });
    }
    Ok(&bytes[start as usize..end as usize])
}

/// The vmlinux ELF in bzImage `name`'s payload, decompressed; refuses one larger than
/// `max` bytes (the guest's RAM: nothing larger can be loaded, and a corrupt stream must
/// not exhaust the host's memory).
pub fn vmlinux(name: &str, bytes: &[u8], max: u64) -> Result<Vec<u8>, LoadError> {
    let payload = payload(name, bytes)?;
    let bad = |problem: String| LoadError::BzImage {
        name: name.to_string(),
        problem,
    };
    let compression = Compression::detect(payload).ok_or_else(|| {
        bad(format!(
            "the payload starts with {:02x?}, the magic of no compression Linux uses",
            &payload[..payload.len().min(6)]
        ))
    })?;
    let reader: Box<dyn Read + '_> = match compression {
        Compression::None => Box::new(payload),
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(payload)),
        Compression::Xz => Box::new(liblzma::read::XzDecoder::new(payload)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(payload)
                .map_err(|e| bad(format!("the zstd payload: {e}")))?
                .single_frame(),
        ),
        Compression::Lz4 => return lz4_legacy(payload, max).map_err(bad),
        other => {
            return Err(bad(format!(
                "the payload is {}-compressed; deja decompresses xz, gzip, zstd and lz4 \
                 payloads (boot this kernel with --kernel-entry boot-protocol)",
                other.name()
            )));
        }
    };
    let mut out = Vec::new();
    reader
        .take(max.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| {
            bad(format!(
                "decompressing the {} payload ({:#x} bytes) failed: {e}",
                compression.name(),
                payload.len()
            ))
        })?;
    if out.len() as u64 > max {
        return Err(bad(format!(
            "the {} payload decompresses to more than {max:#x} bytes, more than the guest's RAM",
            compression.name()
        )));
    }
    Ok(out)
}

/// The magic of lz4's legacy frame, which may also start a concatenated frame.
const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;
/// The most a legacy-frame block decompresses to.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

/// Decompresses lz4's legacy frame (`lz4 -l`, what Linux's `CONFIG_KERNEL_LZ4` writes):
/// the magic, then blocks of a 4-byte compressed length and an independent LZ4 block of at
/// most 8 MiB; a magic between blocks starts another frame. The 4 bytes Linux appends (the
/// uncompressed size) end the stream; so does its end. At most `max` bytes come out.
fn lz4_legacy(payload: &[u8], max: u64) -> Result<Vec<u8>, String> {
    let word = |at: usize| {
        u32::from_le_bytes([
            payload[at],
            payload[at + 1],
            payload[at + 2],
            payload[at + 3],
        ])
    };
    let mut out = Vec::new();
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    let mut at = 4; // after the magic
    while payload.len() - at >= 4 {
        let len = word(at);
        at += 4;
        if len == LZ4_LEGACY_MAGIC {
            continue;
        }
        if at == payload.len() {
            break; // Linux's uncompressed-size trailer
        }
        let end = at
            .checked_add(len as usize)
            .filter(|&e| e <= payload.len())
            .ok_or_else(|| {
                format!(
                    "the lz4 payload's block at offset {:#x} is {len:#x} bytes long, past the \
                     payload's end at {:#x}",
                    at - 4,
                    payload.len()
                )
            })?;
        let n = lz4_flex::block::decompress_into(&payload[at..end], &mut block).map_err(|e| {
            format!(
                "decompressing the lz4 payload's block at offset {:#x} failed: {e}",
                at - 4
            )
        })?;
        if (out.len() + n) as u64 > max {
            return Err(format!(
                "the lz4 payload decompresses to more than {max:#x} bytes, more than the \
                 guest's RAM"
            ));
        }
        out.extend_from_slice(&block[..n]);
        at = end;
    }
    Ok(out)
}
