//! The subset of ELF32 a multiboot loader needs: the file header and the PT_LOAD program
//! headers, validated against the file so that loading never reads outside it.

use thiserror::Error;

/// `e_machine` of 32-bit x86.
pub const EM_386: u16 = 3;
/// `e_machine` of x86-64.
pub const EM_X86_64: u16 = 62;
/// `p_type` of a loadable segment.
pub const PT_LOAD: u32 = 1;
/// `p_flags` bit of an executable segment.
pub const PF_X: u32 = 1;
/// Size of the ELF32 file header.
pub const EHDR32_SIZE: usize = 52;
/// Size of one ELF32 program header.
pub const PHDR32_SIZE: usize = 32;

/// What is wrong with an ELF file, naming the field or program header and its value.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ElfError {
    /// The file is shorter than the ELF32 header.
    #[error("ELF header truncated: the file has {len} bytes, an ELF32 header needs {EHDR32_SIZE}")]
    Truncated {
        /// The file's length.
        len: usize,
    },
    /// The first four bytes are not `\x7fELF`.
    #[error("not an ELF file: e_ident magic is {found:02x?}, expected [7f, 45, 4c, 46]")]
    BadMagic {
        /// The bytes found.
        found: [u8; 4],
    },
    /// A header field has a value this loader does not accept.
    #[error("ELF header field {field} (offset {offset:#x}) is {value:#x}: {expected}")]
    BadField {
        /// The field's name.
        field: &'static str,
        /// Its offset in the file.
        offset: usize,
        /// Its value.
        value: u64,
        /// What was expected.
        expected: &'static str,
    },
    /// The program header table does not lie inside the file.
    #[error(
        "ELF program header table (e_phoff {phoff:#x}, {phnum} entries of {phentsize} bytes) \
         extends past the end of the file ({len:#x} bytes)"
    )]
    PhdrsOutsideFile {
        /// e_phoff.
        phoff: u32,
        /// e_phnum.
        phnum: u16,
        /// e_phentsize.
        phentsize: u16,
        /// The file's length.
        len: usize,
    },
    /// A program header is inconsistent.
    #[error("ELF program header {index} (at file offset {at:#x}): {problem}")]
    BadSegment {
        /// Its index.
        index: usize,
        /// Its offset in the file.
        at: usize,
        /// What is wrong, naming the fields and their values.
        problem: String,
    },
    /// There is nothing to load.
    #[error("ELF file has no PT_LOAD segment with a non-zero p_memsz")]
    NoLoadableSegment,
}

/// One PT_LOAD segment, checked: `offset + filesz` is inside the file, `filesz <= memsz`,
/// `paddr + memsz <= 4 GiB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Index of its program header.
    pub index: usize,
    /// p_offset.
    pub offset: u32,
    /// p_vaddr.
    pub vaddr: u32,
    /// p_paddr: where a multiboot loader puts it (as QEMU and GRUB do).
    pub paddr: u32,
    /// p_filesz.
    pub filesz: u32,
    /// p_memsz (the rest after `filesz` is zero-filled bss).
    pub memsz: u32,
    /// p_flags ([`PF_X`], write, read).
    pub flags: u32,
}

impl Segment {
    /// One past the segment's last physical byte.
    pub fn paddr_end(&self) -> u64 {
        u64::from(self.paddr) + u64::from(self.memsz)
    }
}

/// A parsed ELF32 executable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Elf32 {
    /// e_entry.
    pub entry: u32,
    /// The PT_LOAD segments with a non-zero p_memsz, in program-header order.
    pub segments: Vec<Segment>,
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// The `e_machine` field, if the file is long enough to have one (it sits at the same
/// offset in ELF32 and ELF64).
pub fn machine(bytes: &[u8]) -> Option<u16> {
    (bytes.len() >= 20 && bytes[..4] == *b"\x7fELF").then(|| u16_at(bytes, 18))
}

/// Parses and checks a little-endian ELF32 i386 executable.
pub fn parse_elf32(bytes: &[u8]) -> Result<Elf32, ElfError> {
    if bytes.len() < EHDR32_SIZE {
        return Err(ElfError::Truncated { len: bytes.len() });
    }
    if bytes[..4] != *b"\x7fELF" {
        return Err(ElfError::BadMagic {
            found: [bytes[0], bytes[1], bytes[2], bytes[3]],
        });
    }
    let field = |field, offset, value: u64, expected| ElfError::BadField {
        field,
        offset,
        value,
        expected,
    };
    if bytes[4] != 1 {
        return Err(field(
            "EI_CLASS",
            4,
            bytes[4].into(),
            "expected 1 (ELFCLASS32)",
        ));
    }
    if bytes[5] != 1 {
        return Err(field(
            "EI_DATA",
            5,
            bytes[5].into(),
            "expected 1 (little endian)",
        ));
    }
    let e_type = u16_at(bytes, 16);
    if e_type != 2 {
        return Err(field("e_type", 16, e_type.into(), "expected 2 (ET_EXEC)"));
    }
    let e_machine = u16_at(bytes, 18);
    if e_machine != EM_386 {
        return Err(field(
            "e_machine",
            18,
            e_machine.into(),
            "expected 3 (EM_386)",
        ));
    }
    let entry = u32_at(bytes, 24);
    let phoff = u32_at(bytes, 28);
    let phentsize = u16_at(bytes, 42);
    let phnum = u16_at(bytes, 44);
    if phnum > 0 && usize::from(phentsize) < PHDR32_SIZE {
        return Err(field(
            "e_phentsize",
            42,
            phentsize.into(),
            "expected at least 32",
        ));
    }
    let table_end = u64::from(phoff) + u64::from(phnum) * u64::from(phentsize);
    if table_end > bytes.len() as u64 {
        return Err(ElfError::PhdrsOutsideFile {
            phoff,
            phnum,
            phentsize,
            len: bytes.len(),
        });
    }
    let mut segments = Vec::new();
    for index in 0..usize::from(phnum) {
        let at = phoff as usize + index * usize::from(phentsize);
        let h = &bytes[at..at + PHDR32_SIZE];
        if u32_at(h, 0) != PT_LOAD {
            continue;
        }
        let s = Segment {
            index,
            offset: u32_at(h, 4),
            vaddr: u32_at(h, 8),
            paddr: u32_at(h, 12),
            filesz: u32_at(h, 16),
            memsz: u32_at(h, 20),
            flags: u32_at(h, 24),
        };
        let bad = |problem: String| ElfError::BadSegment { index, at, problem };
        if s.filesz > s.memsz {
            return Err(bad(format!(
                "p_filesz {:#x} is larger than p_memsz {:#x}",
                s.filesz, s.memsz
            )));
        }
        let file_end = u64::from(s.offset) + u64::from(s.filesz);
        if file_end > bytes.len() as u64 {
            return Err(bad(format!(
                "p_offset {:#x} + p_filesz {:#x} = {file_end:#x} is past the end of the file \
                 ({:#x} bytes)",
                s.offset,
                s.filesz,
                bytes.len()
            )));
        }
        if s.paddr_end() > 1 << 32 {
            return Err(bad(format!(
                "p_paddr {:#x} + p_memsz {:#x} is beyond 4 GiB",
                s.paddr, s.memsz
            )));
        }
        if s.memsz > 0 {
            segments.push(s);
        }
    }
    if segments.is_empty() {
        return Err(ElfError::NoLoadableSegment);
    }
    Ok(Elf32 { entry, segments })
}
