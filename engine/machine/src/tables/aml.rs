//! A small encoder of ACPI Machine Language (ACPI 6.5, chapter 20) for the DSDT deja writes,
//! and of the resource descriptors (chapter 6.4) its `_CRS` objects hold.
//!
//! deja encodes AML itself rather than through a crate: the bytes are guest memory, which
//! every state digest of a trace covers, so a table revision must produce the same bytes
//! for as long as traces recorded with it are replayed. A dependency's upgrade could change
//! its encoding (a shorter integer, another package length form) and break old traces
//! silently; these few hundred lines change only with a new table revision.
//!
//! Every builder returns the encoded bytes of one term; terms nest by passing their bytes to
//! the enclosing builder (a [`scope`] or [`device`] body is the concatenation of its terms).
//! Only what the DSDT uses is here: names, integers, strings, packages, buffers, scopes and
//! devices; the resource descriptors are in [`resource`].

use thiserror::Error;

/// What could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AmlError {
    /// A name segment is empty, longer than four characters or has a character AML names
    /// cannot hold (a leading `A`-`Z` or `_`, then `A`-`Z`, `0`-`9` or `_`).
    #[error(
        "AML name segment {segment:?} in {path:?} is not 1-4 of A-Z, 0-9, _ (not a digit first)"
    )]
    BadName {
        /// The whole name given.
        path: String,
        /// The offending segment.
        segment: String,
    },
    /// A name path has more than 255 segments.
    #[error("AML name {path:?} has {segments} segments; at most 255 fit a name string")]
    NameTooLong {
        /// The whole name given.
        path: String,
        /// How many segments it has.
        segments: usize,
    },
    /// A package, scope, device or buffer is larger than a package length can say (2^28
    /// bytes).
    #[error("an AML {what} of {len} bytes is larger than a package length holds (2^28 - 1)")]
    TooLarge {
        /// What was being encoded.
        what: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// A package has more than 255 elements (PackageOp's count is one byte).
    #[error("an AML package of {count} elements exceeds PackageOp's 255")]
    TooManyElements {
        /// Elements given.
        count: usize,
    },
    /// A string holds a NUL or a non-ASCII character (AML strings are ASCII, NUL-ended).
    #[error("AML string {text:?} holds a NUL or a non-ASCII character")]
    BadString {
        /// The text given.
        text: String,
    },
    /// An EISA ID is not three letters `A`-`Z` and four hex digits (e.g. `PNP0A03`).
    #[error("EISA ID {id:?} is not three capital letters and four hex digits")]
    BadEisaId {
        /// The ID given.
        id: String,
    },
    /// An IRQ descriptor names an IRQ above 15 (the descriptor's mask is 16 bits).
    #[error("IRQ {irq} does not fit an IRQ descriptor (0-15)")]
    BadIrq {
        /// The IRQ given.
        irq: u8,
    },
}

const ZERO_OP: u8 = 0x00;
const ONE_OP: u8 = 0x01;
const NAME_OP: u8 = 0x08;
const BYTE_PREFIX: u8 = 0x0a;
const WORD_PREFIX: u8 = 0x0b;
const DWORD_PREFIX: u8 = 0x0c;
const STRING_PREFIX: u8 = 0x0d;
const SCOPE_OP: u8 = 0x10;
const BUFFER_OP: u8 = 0x11;
const PACKAGE_OP: u8 = 0x12;
const DUAL_NAME_PREFIX: u8 = 0x2e;
const MULTI_NAME_PREFIX: u8 = 0x2f;
const EXT_OP_PREFIX: u8 = 0x5b;
const DEVICE_OP: u8 = 0x82;
const ROOT_CHAR: u8 = b'\\';
const PARENT_PREFIX_CHAR: u8 = b'^';

/// One name segment, padded to four characters with `_` as ASL does.
fn name_seg(path: &str, seg: &str) -> Result<[u8; 4], AmlError> {
    let bad = || AmlError::BadName {
        path: path.to_string(),
        segment: seg.to_string(),
    };
    let b = seg.as_bytes();
    if b.is_empty() || b.len() > 4 || b[0].is_ascii_digit() {
        return Err(bad());
    }
    if !b
        .iter()
        .all(|&c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_')
    {
        return Err(bad());
    }
    let mut out = [b'_'; 4];
    out[..b.len()].copy_from_slice(b);
    Ok(out)
}

/// A NameString: an optional root (`\`) or parent (`^`, repeatable) prefix, then
/// dot-separated segments (`\_SB.PCI0`, `_HID`, `^^ISA`).
pub fn name_string(path: &str) -> Result<Vec<u8>, AmlError> {
    let mut out = Vec::new();
    let mut rest = path;
    if let Some(r) = rest.strip_prefix('\\') {
        out.push(ROOT_CHAR);
        rest = r;
    } else {
        while let Some(r) = rest.strip_prefix('^') {
            out.push(PARENT_PREFIX_CHAR);
            rest = r;
        }
    }
    if rest.is_empty() {
        // The root itself (`\`) or a bare prefix: a NullName follows.
        if out.is_empty() {
            return Err(AmlError::BadName {
                path: path.to_string(),
                segment: String::new(),
            });
        }
        out.push(0);
        return Ok(out);
    }
    let segs = rest
        .split('.')
        .map(|s| name_seg(path, s))
        .collect::<Result<Vec<_>, _>>()?;
    match segs.len() {
        1 => {}
        2 => out.push(DUAL_NAME_PREFIX),
        n if n <= 255 => {
            out.push(MULTI_NAME_PREFIX);
            out.push(n as u8);
        }
        n => {
            return Err(AmlError::NameTooLong {
                path: path.to_string(),
                segments: n,
            });
        }
    }
    for s in segs {
        out.extend_from_slice(&s);
    }
    Ok(out)
}

/// A PkgLength for `body_len` bytes following it: the encoded length counts its own bytes
/// (ACPI 6.5 20.2.4), one byte up to 63, else a lead byte with the count of the bytes that
/// follow in bits 7-6 and the low nibble in bits 3-0.
pub fn pkg_length(body_len: usize, what: &'static str) -> Result<Vec<u8>, AmlError> {
    let too_large = || AmlError::TooLarge {
        what,
        len: body_len,
    };
    if body_len < 0x3f {
        return Ok(vec![(body_len + 1) as u8]);
    }
    for extra in 1..=3usize {
        let total = body_len.checked_add(extra + 1).ok_or_else(too_large)?;
        if total < 1 << (4 + 8 * extra) {
            let mut out = vec![((extra as u8) << 6) | (total & 0xf) as u8];
            for i in 0..extra {
                out.push((total >> (4 + 8 * i)) as u8);
            }
            return Ok(out);
        }
    }
    Err(too_large())
}

/// `op`, a PkgLength for `body`, then `body`.
fn with_pkg_length(op: &[u8], body: &[u8], what: &'static str) -> Result<Vec<u8>, AmlError> {
    let mut out = op.to_vec();
    out.extend(pkg_length(body.len(), what)?);
    out.extend_from_slice(body);
    Ok(out)
}

/// An integer in the shortest form: ZeroOp, OneOp, or a byte, word or dword constant. The
/// DSDT is revision 1 (32-bit integers), so nothing wider is offered.
pub fn integer(v: u32) -> Vec<u8> {
    match v {
        0 => vec![ZERO_OP],
        1 => vec![ONE_OP],
        2..=0xff => vec![BYTE_PREFIX, v as u8],
        0x100..=0xffff => {
            let mut out = vec![WORD_PREFIX];
            out.extend_from_slice(&(v as u16).to_le_bytes());
            out
        }
        _ => {
            let mut out = vec![DWORD_PREFIX];
            out.extend_from_slice(&v.to_le_bytes());
            out
        }
    }
}

/// A string constant.
pub fn string(text: &str) -> Result<Vec<u8>, AmlError> {
    if !text.bytes().all(|b| b != 0 && b.is_ascii()) {
        return Err(AmlError::BadString {
            text: text.to_string(),
        });
    }
    let mut out = vec![STRING_PREFIX];
    out.extend_from_slice(text.as_bytes());
    out.push(0);
    Ok(out)
}

/// The compressed EISA ID of `id` (ASL's `EisaId("PNP0A03")`) as an integer: three letters
/// of five bits each and four hex digits, stored big-endian in a little-endian dword.
pub fn eisa_id(id: &str) -> Result<Vec<u8>, AmlError> {
    let bad = || AmlError::BadEisaId { id: id.to_string() };
    let b = id.as_bytes();
    if b.len() != 7 || !b[..3].iter().all(u8::is_ascii_uppercase) {
        return Err(bad());
    }
    // Checked byte by byte first: from_str_radix would take a sign, and slicing a string
    // with a multi-byte character there could split it.
    if !b[3..].iter().all(u8::is_ascii_hexdigit) {
        return Err(bad());
    }
    let hex = b[3..].iter().fold(0u32, |acc, &c| {
        acc << 4 | (c as char).to_digit(16).unwrap_or(0)
    });
    let letters = b[..3]
        .iter()
        .fold(0u32, |acc, &c| acc << 5 | u32::from(c - 0x40));
    Ok(integer((letters << 16 | hex).swap_bytes()))
}

/// `Name (path, value)`: `value` is an encoded data object (integer, string, package,
/// buffer).
pub fn name(path: &str, value: &[u8]) -> Result<Vec<u8>, AmlError> {
    let mut out = vec![NAME_OP];
    out.extend(name_string(path)?);
    out.extend_from_slice(value);
    Ok(out)
}

/// `Scope (path) { body }`.
pub fn scope(path: &str, body: &[u8]) -> Result<Vec<u8>, AmlError> {
    let mut inner = name_string(path)?;
    inner.extend_from_slice(body);
    with_pkg_length(&[SCOPE_OP], &inner, "scope")
}

/// `Device (path) { body }`.
pub fn device(path: &str, body: &[u8]) -> Result<Vec<u8>, AmlError> {
    let mut inner = name_string(path)?;
    inner.extend_from_slice(body);
    with_pkg_length(&[EXT_OP_PREFIX, DEVICE_OP], &inner, "device")
}

/// `Package () { elements }`, each element an encoded data object.
pub fn package(elements: &[Vec<u8>]) -> Result<Vec<u8>, AmlError> {
    let count = u8::try_from(elements.len()).map_err(|_| AmlError::TooManyElements {
        count: elements.len(),
    })?;
    let mut inner = vec![count];
    for e in elements {
        inner.extend_from_slice(e);
    }
    with_pkg_length(&[PACKAGE_OP], &inner, "package")
}

/// `Buffer () { bytes }`: its size as an integer, then the bytes.
pub fn buffer(bytes: &[u8]) -> Result<Vec<u8>, AmlError> {
    let size = u32::try_from(bytes.len()).map_err(|_| AmlError::TooLarge {
        what: "buffer",
        len: bytes.len(),
    })?;
    let mut inner = integer(size);
    inner.extend_from_slice(bytes);
    with_pkg_length(&[BUFFER_OP], &inner, "buffer")
}

/// Resource descriptors (ACPI 6.5 6.4), as `ResourceTemplate` writes them: the bytes of a
/// `_CRS` buffer are [`template`] of the descriptors.
pub mod resource {
    use super::AmlError;

    /// The end tag (checksum 0: "treated as if the checksum operation succeeded").
    const END_TAG: [u8; 2] = [0x79, 0x00];

    /// Address space resource types.
    const SPACE_MEMORY: u8 = 0;
    const SPACE_IO: u8 = 1;
    const SPACE_BUS: u8 = 2;
    /// General flags of an address space descriptor the bridge produces: a fixed minimum
    /// and maximum (`_MIF`, `_MAF`), positive decode, producer.
    const PRODUCER_FIXED: u8 = 1 << 3 | 1 << 2;
    /// I/O type-specific flags: `_RNG` EntireRange (ISA and non-ISA addresses).
    const IO_ENTIRE_RANGE: u8 = 3;
    /// Memory type-specific flags: read/write, and `_MEM` cacheable (1) or not (0).
    const MEM_READ_WRITE: u8 = 1;
    const MEM_CACHEABLE: u8 = 1 << 1;

    /// `IO (Decode16, min, max, align, len)`: a fixed range of `len` ports at `min` when
    /// `min == max`.
    pub fn io(min: u16, max: u16, align: u8, len: u8) -> Vec<u8> {
        let mut out = vec![0x47, 0x01];
        out.extend_from_slice(&min.to_le_bytes());
        out.extend_from_slice(&max.to_le_bytes());
        out.extend_from_slice(&[align, len]);
        out
    }

    /// `IRQNoFlags () { irqs }`: edge-triggered, active-high ISA IRQs.
    pub fn irq_no_flags(irqs: &[u8]) -> Result<Vec<u8>, AmlError> {
        let mut mask = 0u16;
        for &irq in irqs {
            if irq > 15 {
                return Err(AmlError::BadIrq { irq });
            }
            mask |= 1 << irq;
        }
        let mut out = vec![0x22];
        out.extend_from_slice(&mask.to_le_bytes());
        Ok(out)
    }

    /// A word address space descriptor `min..=max` the bridge produces, no translation.
    fn word_space(space: u8, type_flags: u8, min: u16, max: u16) -> Vec<u8> {
        let len = (u32::from(max) - u32::from(min.min(max)) + 1) as u16;
        let mut out = vec![0x88, 13, 0, space, PRODUCER_FIXED, type_flags];
        for v in [0u16, min, max, 0, len] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// `WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, min, max, 0,
    /// len)`: the bus numbers behind a host bridge.
    pub fn word_bus_number(min: u16, max: u16) -> Vec<u8> {
        word_space(SPACE_BUS, 0, min, max)
    }

    /// `WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0, min, max,
    /// 0, len)`: a port window a host bridge forwards.
    pub fn word_io(min: u16, max: u16) -> Vec<u8> {
        word_space(SPACE_IO, IO_ENTIRE_RANGE, min, max)
    }

    /// `DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, Cacheable or
    /// NonCacheable, ReadWrite, 0, min, max, 0, len)`: a memory window a host bridge
    /// forwards.
    pub fn dword_memory(min: u32, max: u32, cacheable: bool) -> Vec<u8> {
        let len = max.wrapping_sub(min.min(max)).wrapping_add(1);
        let flags = MEM_READ_WRITE | if cacheable { MEM_CACHEABLE } else { 0 };
        let mut out = vec![0x87, 23, 0, SPACE_MEMORY, PRODUCER_FIXED, flags];
        for v in [0u32, min, max, 0, len] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// `ResourceTemplate () { descriptors }`: the buffer object, the end tag added.
    pub fn template(descriptors: &[Vec<u8>]) -> Result<Vec<u8>, AmlError> {
        let mut bytes: Vec<u8> = descriptors.concat();
        bytes.extend_from_slice(&END_TAG);
        super::buffer(&bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::resource::*;
    use super::*;

    /// The largest value a package length encodes.
    const MAX_PKG_LENGTH: usize = (1 << 28) - 1;

    #[test]
    fn package_lengths_count_their_own_bytes_in_each_form() {
        // (body length, encoding): the boundaries of each form.
        let cases: &[(usize, &[u8])] = &[
            (0, &[0x01]),
            (5, &[0x06]),
            (0x3e, &[0x3f]),
            // 0x3f + 2 = 0x41: two bytes, low nibble 1, then 0x04.
            (0x3f, &[0x41, 0x04]),
            (0xffd, &[0x4f, 0xff]),
            // 0xffe + 3 = 0x1001: three bytes.
            (0xffe, &[0x81, 0x00, 0x01]),
            (0xf_fffc, &[0x8f, 0xff, 0xff]),
            (0xf_fffd, &[0xc1, 0x00, 0x00, 0x01]),
            (MAX_PKG_LENGTH - 4, &[0xcf, 0xff, 0xff, 0xff]),
        ];
        for &(len, want) in cases {
            assert_eq!(pkg_length(len, "test").unwrap(), want, "body {len:#x}");
        }
        assert_eq!(
            pkg_length(MAX_PKG_LENGTH - 3, "package"),
            Err(AmlError::TooLarge {
                what: "package",
                len: MAX_PKG_LENGTH - 3
            })
        );
        assert!(pkg_length(usize::MAX, "package").is_err());
    }

    #[test]
    fn integers_take_the_shortest_form() {
        assert_eq!(integer(0), [0x00]);
        assert_eq!(integer(1), [0x01]);
        assert_eq!(integer(2), [0x0a, 0x02]);
        assert_eq!(integer(0xff), [0x0a, 0xff]);
        assert_eq!(integer(0x100), [0x0b, 0x00, 0x01]);
        assert_eq!(integer(0x1_0000), [0x0c, 0x00, 0x00, 0x01, 0x00]);
        assert_eq!(integer(u32::MAX), [0x0c, 0xff, 0xff, 0xff, 0xff]);
    }

    #[test]
    fn names_are_padded_prefixed_and_checked() {
        assert_eq!(name_string("_HID").unwrap(), b"_HID");
        assert_eq!(name_string("ISA").unwrap(), b"ISA_");
        assert_eq!(name_string("\\_SB").unwrap(), b"\\_SB_");
        assert_eq!(name_string("\\_SB.PCI0").unwrap(), b"\\\x2e_SB_PCI0");
        assert_eq!(name_string("^^A.B.C").unwrap(), b"^^\x2f\x03A___B___C___");
        assert_eq!(name_string("\\").unwrap(), b"\\\0");
        for bad in ["", "_hid", "TOOLONG", "0ABC", "A..B", "A-B", "\\_SB."] {
            assert!(
                matches!(name_string(bad), Err(AmlError::BadName { .. })),
                "{bad:?}"
            );
        }
        let long = vec!["A"; 256].join(".");
        assert_eq!(
            name_string(&long),
            Err(AmlError::NameTooLong {
                path: long.clone(),
                segments: 256
            })
        );
    }

    #[test]
    fn eisa_ids_compress_as_asl_does() {
        // The values iasl gives these IDs.
        let cases: &[(&str, u32)] = &[
            ("PNP0A03", 0x030a_d041),
            ("PNP0501", 0x0105_d041),
            ("PNP0B00", 0x000b_d041),
            ("PNP0303", 0x0303_d041),
            ("PNP0100", 0x0001_d041),
        ];
        for &(id, want) in cases {
            assert_eq!(eisa_id(id).unwrap(), integer(want), "{id}");
        }
        for bad in [
            "PNP0A0", "pnp0A03", "PNP0G03", "P1P0A03", "PNP0A030", "PNP+A03",
        ] {
            assert!(eisa_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn strings_end_in_nul_and_refuse_what_aml_cannot_hold() {
        assert_eq!(string("ab").unwrap(), b"\x0dab\0");
        assert!(string("a\0b").is_err());
        assert!(string("é").is_err());
    }

    #[test]
    fn terms_nest_with_their_package_lengths() {
        // Name (_S5, Package (4) { Zero, Zero, Zero, Zero }): the bytes deja's first table
        // revision wrote by hand.
        let s5 = name("_S5", &package(&vec![integer(0); 4]).unwrap()).unwrap();
        assert_eq!(
            s5,
            [0x08, b'_', b'S', b'5', b'_', 0x12, 0x06, 0x04, 0, 0, 0, 0]
        );
        // Device (\_SB.DEV) { Name (_UID, One) } inside a scope.
        let dev = device("DEV", &name("_UID", &integer(1)).unwrap()).unwrap();
        assert_eq!(dev, b"\x5b\x82\x0bDEV_\x08_UID\x01");
        let sb = scope("\\_SB", &dev).unwrap();
        assert_eq!(sb[0], 0x10);
        assert_eq!(usize::from(sb[1]), sb.len() - 1);
        assert_eq!(&sb[2..7], b"\\_SB_");
        assert_eq!(&sb[7..], &dev[..]);
        // A body past 62 bytes takes a two-byte length.
        let big = device("BIG", &[0xa3; 100]).unwrap();
        assert_eq!(&big[..4], &[0x5b, 0x82, 0x4a, 0x06]);
        assert_eq!(big.len(), 2 + 2 + 4 + 100);
        assert_eq!(
            package(&vec![integer(0); 256]),
            Err(AmlError::TooManyElements { count: 256 })
        );
    }

    #[test]
    fn resource_descriptors_have_their_spec_layouts() {
        assert_eq!(io(0x3f8, 0x3f8, 0, 8), [0x47, 1, 0xf8, 3, 0xf8, 3, 0, 8]);
        assert_eq!(irq_no_flags(&[4]).unwrap(), [0x22, 0x10, 0x00]);
        assert_eq!(irq_no_flags(&[1, 8]).unwrap(), [0x22, 0x02, 0x01]);
        assert_eq!(irq_no_flags(&[16]), Err(AmlError::BadIrq { irq: 16 }));
        assert_eq!(
            word_bus_number(0, 0xff),
            [
                0x88, 13, 0, 2, 0x0c, 0, 0, 0, 0, 0, 0xff, 0, 0, 0, 0x00, 0x01
            ]
        );
        assert_eq!(
            word_io(0xd00, 0xffff),
            [
                0x88, 13, 0, 1, 0x0c, 3, 0, 0, 0x00, 0x0d, 0xff, 0xff, 0, 0, 0x00, 0xf3
            ]
        );
        let m = dword_memory(0xa_0000, 0xb_ffff, true);
        assert_eq!(&m[..6], &[0x87, 23, 0, 0, 0x0c, 0x03]);
        assert_eq!(&m[10..14], &0xa_0000u32.to_le_bytes());
        assert_eq!(&m[14..18], &0xb_ffffu32.to_le_bytes());
        assert_eq!(&m[22..26], &0x2_0000u32.to_le_bytes());
        assert_eq!(m.len(), 26);
        assert_eq!(dword_memory(0, u32::MAX, false)[5], 0x01);
        // The template is a buffer: size, descriptors, end tag.
        let t = template(&[irq_no_flags(&[0]).unwrap()]).unwrap();
        assert_eq!(t, [0x11, 0x08, 0x0a, 0x05, 0x22, 0x01, 0x00, 0x79, 0x00]);
    }
}
