//! The subset of ELF a kernel loader needs, validated against the file so that loading
//! never reads outside it: for ELF32 (multiboot) the file header and the PT_LOAD program
//! headers; for ELF64 (a Linux `vmlinux` booted through PVH) the same plus the notes of
//! its PT_NOTE segments, where the PVH entry point is.

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
/// `p_type` of a segment of notes.
pub const PT_NOTE: u32 = 4;
/// Size of the ELF64 file header.
pub const EHDR64_SIZE: usize = 64;
/// Size of one ELF64 program header.
pub const PHDR64_SIZE: usize = 56;

/// What is wrong with an ELF file, naming the field or program header and its value.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ElfError {
    /// The file is shorter than the ELF32 header.
    #[error("ELF header truncated: the file has {len} bytes, an ELF32 header needs {EHDR32_SIZE}")]
    Truncated {
        /// The file's length.
        len: usize,
    },
    /// The file is shorter than the ELF64 header.
    #[error("ELF header truncated: the file has {len} bytes, an ELF64 header needs {EHDR64_SIZE}")]
    Truncated64 {
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
    /// The ELF64 program header table does not lie inside the file.
    #[error(
        "ELF program header table (e_phoff {phoff:#x}, {phnum} entries of {phentsize} bytes) \
         extends past the end of the file ({len:#x} bytes)"
    )]
    Phdrs64OutsideFile {
        /// e_phoff.
        phoff: u64,
        /// e_phnum.
        phnum: u16,
        /// e_phentsize.
        phentsize: u16,
        /// The file's length.
        len: usize,
    },
    /// A note in a PT_NOTE segment runs past the segment's end.
    #[error(
        "ELF note at file offset {at:#x} (in program header {index}): namesz {namesz:#x} and \
         descsz {descsz:#x} run past the segment's end at {end:#x}"
    )]
    BadNote {
        /// The PT_NOTE program header's index.
        index: usize,
        /// The note's offset in the file.
        at: usize,
        /// n_namesz.
        namesz: u32,
        /// n_descsz.
        descsz: u32,
        /// One past the segment's last file byte.
        end: usize,
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

/// Checks what ELF32 and ELF64 executables share at the start of their header (the caller
/// has checked the length): magic, class, little endian, ET_EXEC and the machine.
fn check_ident(
    bytes: &[u8],
    class: u8,
    class_expected: &'static str,
    machine: u16,
    machine_expected: &'static str,
) -> Result<(), ElfError> {
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
    if bytes[4] != class {
        return Err(field("EI_CLASS", 4, bytes[4].into(), class_expected));
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
    if e_machine != machine {
        return Err(field("e_machine", 18, e_machine.into(), machine_expected));
    }
    Ok(())
}

/// Parses and checks a little-endian ELF32 i386 executable.
pub fn parse_elf32(bytes: &[u8]) -> Result<Elf32, ElfError> {
    if bytes.len() < EHDR32_SIZE {
        return Err(ElfError::Truncated { len: bytes.len() });
    }
    check_ident(
        bytes,
        1,
        "expected 1 (ELFCLASS32)",
        EM_386,
        "expected 3 (EM_386)",
    )?;
    let field = |field, offset, value: u64, expected| ElfError::BadField {
        field,
        offset,
        value,
        expected,
    };
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

/// One checked ELF64 PT_LOAD segment: `offset + filesz` is inside the file, `filesz <=
/// memsz`, and `paddr + memsz` does not overflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment64 {
    /// Index of its program header.
    pub index: usize,
    /// p_offset.
    pub offset: u64,
    /// p_vaddr.
    pub vaddr: u64,
    /// p_paddr: where a PVH loader puts it (a vmlinux's virtual addresses are in the
    /// kernel's high mapping; its physical ones are where it runs before paging).
    pub paddr: u64,
    /// p_filesz.
    pub filesz: u64,
    /// p_memsz (the rest after `filesz` is zero-filled bss).
    pub memsz: u64,
    /// p_flags.
    pub flags: u32,
}

impl Segment64 {
    /// One past the segment's last physical byte.
    pub fn paddr_end(&self) -> u64 {
        self.paddr + self.memsz
    }

    /// The segment's bytes in the file.
    pub fn file_bytes<'a>(&self, bytes: &'a [u8]) -> &'a [u8] {
        &bytes[self.offset as usize..(self.offset + self.filesz) as usize]
    }
}

/// One ELF note.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Note<'a> {
    /// Its owner (n_name without the terminating NUL), e.g. `b"Xen"`.
    pub name: &'a [u8],
    /// n_type, whose meaning depends on the owner.
    pub kind: u32,
    /// Its descriptor.
    pub desc: &'a [u8],
    /// Its offset in the file, for messages.
    pub at: usize,
}

/// A parsed little-endian x86-64 ELF64 executable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Elf64<'a> {
    /// e_entry.
    pub entry: u64,
    /// The PT_LOAD segments with a non-zero p_memsz, in program-header order.
    pub segments: Vec<Segment64>,
    /// The notes of every PT_NOTE segment, in file order.
    pub notes: Vec<Note<'a>>,
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from(u32_at(b, off)) | (u64::from(u32_at(b, off + 4)) << 32)
}

/// Whether `bytes` start like a little-endian x86-64 ELF64 file (magic, class 2, data 1,
/// e_machine 62): then it is parsed with [`parse_elf64`], not taken for anything else.
pub fn is_elf64_x86_64(bytes: &[u8]) -> bool {
    bytes.len() >= 20 && bytes[4] == 2 && bytes[5] == 1 && machine(bytes) == Some(EM_X86_64)
}

/// Parses and checks a little-endian x86-64 ELF64 executable: its PT_LOAD segments and the
/// notes of its PT_NOTE segments. Bytes after the last segment (a bzImage payload appends
/// the kernel's relocations to its vmlinux) are ignored.
pub fn parse_elf64(bytes: &[u8]) -> Result<Elf64<'_>, ElfError> {
    if bytes.len() < EHDR64_SIZE {
        return Err(ElfError::Truncated64 { len: bytes.len() });
    }
    check_ident(
        bytes,
        2,
        "expected 2 (ELFCLASS64)",
        EM_X86_64,
        "expected 62 (EM_X86_64)",
    )?;
    let field = |field, offset, value: u64, expected| ElfError::BadField {
        field,
        offset,
        value,
        expected,
    };
    let entry = u64_at(bytes, 24);
    let phoff = u64_at(bytes, 32);
    let phentsize = u16_at(bytes, 54);
    let phnum = u16_at(bytes, 56);
    if phnum > 0 && usize::from(phentsize) < PHDR64_SIZE {
        return Err(field(
            "e_phentsize",
            54,
            phentsize.into(),
            "expected at least 56",
        ));
    }
    let table_end = u64::from(phnum) * u64::from(phentsize);
    if phoff
        .checked_add(table_end)
        .is_none_or(|end| end > bytes.len() as u64)
    {
        return Err(ElfError::Phdrs64OutsideFile {
            phoff,
            phnum,
            phentsize,
            len: bytes.len(),
        });
    }
    let mut segments = Vec::new();
    let mut notes = Vec::new();
    for index in 0..usize::from(phnum) {
        let at = phoff as usize + index * usize::from(phentsize);
        let h = &bytes[at..at + PHDR64_SIZE];
        let p_type = u32_at(h, 0);
        if p_type != PT_LOAD && p_type != PT_NOTE {
            continue;
        }
        let s = Segment64 {
            index,
            offset: u64_at(h, 8),
            vaddr: u64_at(h, 16),
            paddr: u64_at(h, 24),
            filesz: u64_at(h, 32),
            memsz: u64_at(h, 40),
            flags: u32_at(h, 4),
        };
        let bad = |problem: String| ElfError::BadSegment { index, at, problem };
        let file_end = s.offset.checked_add(s.filesz);
        if file_end.is_none_or(|e| e > bytes.len() as u64) {
            return Err(bad(format!(
                "p_offset {:#x} + p_filesz {:#x} is past the end of the file ({:#x} bytes)",
                s.offset,
                s.filesz,
                bytes.len()
            )));
        }
        if p_type == PT_NOTE {
            let align = u64_at(h, 48);
            parse_notes(bytes, index, &s, if align == 8 { 8 } else { 4 }, &mut notes)?;
            continue;
        }
        if s.filesz > s.memsz {
            return Err(bad(format!(
                "p_filesz {:#x} is larger than p_memsz {:#x}",
                s.filesz, s.memsz
            )));
        }
        if s.paddr.checked_add(s.memsz).is_none() {
            return Err(bad(format!(
                "p_paddr {:#x} + p_memsz {:#x} overflows 64 bits",
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
    Ok(Elf64 {
        entry,
        segments,
        notes,
    })
}

/// Appends the notes of PT_NOTE segment `seg` (already checked to lie in the file), whose
/// name and descriptor are each padded to `align` bytes.
fn parse_notes<'a>(
    bytes: &'a [u8],
    index: usize,
    seg: &Segment64,
    align: usize,
    out: &mut Vec<Note<'a>>,
) -> Result<(), ElfError> {
    let end = (seg.offset + seg.filesz) as usize;
    let mut at = seg.offset as usize;
    // A trailing fragment shorter than a note header is padding.
    while end - at >= 12 {
        let namesz = u32_at(bytes, at);
        let descsz = u32_at(bytes, at + 4);
        let kind = u32_at(bytes, at + 8);
        let bad = ElfError::BadNote {
            index,
            at,
            namesz,
            descsz,
            end,
        };
        let name_at = at + 12;
        let desc_at = (name_at as u64 + u64::from(namesz)).next_multiple_of(align as u64);
        let next = (desc_at + u64::from(descsz)).next_multiple_of(align as u64);
        if desc_at + u64::from(descsz) > end as u64 {
            return Err(bad);
        }
        let name = &bytes[name_at..name_at + namesz as usize];
        out.push(Note {
            name: name.strip_suffix(&[0]).unwrap_or(name),
            kind,
            desc: &bytes[desc_at as usize..desc_at as usize + descsz as usize],
            at,
        });
        at = (next as usize).min(end);
    }
    Ok(())
}
