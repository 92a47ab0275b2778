//! A tiny linker for guests made of sections of different bitness.
//!
//! iced-x86's `CodeAssembler` assembles one bitness at one address, and its labels do not
//! cross assemblers. A guest that boots from real mode to long mode needs 16-, 32- and
//! 64-bit code in one image, with far jumps and descriptor tables that name addresses in
//! other sections. The linker places sections one after the other (each aligned), lets each
//! section export labels by name and look up the names other sections exported, and
//! assembles all sections again until every address is stable (sizes can depend on
//! addresses, so the first pass only guesses).

use iced_x86::BlockEncoderOptions;
use iced_x86::code_asm::{CodeAssembler, CodeLabel};
use std::collections::{BTreeMap, BTreeSet};
use thiserror::Error;

/// Failures while assembling or linking a guest.
#[derive(Debug, Error)]
pub enum LinkError {
    /// iced-x86 rejected an instruction or could not encode the section.
    #[error("assembling section {section:?}: {message}")]
    Assemble {
        /// The section being assembled.
        section: &'static str,
        /// iced-x86's explanation.
        message: String,
    },
    /// A section used a symbol that no section exports.
    #[error("section {section:?} refers to symbol {symbol:?}, which no section exports")]
    UndefinedSymbol {
        /// The section that used the symbol.
        section: &'static str,
        /// The missing symbol.
        symbol: String,
    },
    /// Two sections exported the same name.
    #[error("symbol {symbol:?} is exported twice (again by section {section:?})")]
    DuplicateSymbol {
        /// The second exporter.
        section: &'static str,
        /// The name.
        symbol: String,
    },
    /// Addresses kept changing from pass to pass.
    #[error("section addresses did not settle after {passes} passes")]
    NoFixedPoint {
        /// Passes tried.
        passes: usize,
    },
    /// A section must stay below an address limit (real-mode code below 64 KiB) and does not.
    #[error("section {section:?} ends at {end:#x}, beyond its limit {limit:#x}")]
    SectionTooHigh {
        /// The section.
        section: &'static str,
        /// One past its last byte.
        end: u64,
        /// The limit.
        limit: u64,
    },
}

/// What a section's emitter works with: an assembler of the section's bitness and the
/// symbol table of the previous pass.
pub(crate) struct SectionAsm<'p> {
    /// The assembler; emit instructions and data into it.
    pub a: CodeAssembler,
    name: &'static str,
    previous: &'p BTreeMap<String, u64>,
    used: BTreeSet<String>,
    exports: Vec<(String, CodeLabel)>,
}

impl SectionAsm<'_> {
    /// The address of a symbol another (or this) section exports. Returns the previous
    /// pass's value, or 0 in the first pass; the linker repeats passes until it is right.
    pub fn sym(&mut self, name: &str) -> u64 {
        self.used.insert(name.to_owned());
        self.previous.get(name).copied().unwrap_or(0)
    }

    /// [`SectionAsm::sym`] for addresses that must fit 32 bits (far jumps, descriptors).
    pub fn sym32(&mut self, name: &str) -> u32 {
        self.sym(name) as u32
    }

    /// Places `label` at the current position and exports it under `name`.
    pub fn export(&mut self, name: &str, label: &mut CodeLabel) -> Result<(), LinkError> {
        let section = self.name;
        self.a
            .set_label(label)
            .map_err(|e| assemble_error(section, e))?;
        self.exports.push((name.to_owned(), *label));
        Ok(())
    }

    /// Creates a label and exports it at the current position.
    pub fn export_here(&mut self, name: &str) -> Result<(), LinkError> {
        let mut label = self.a.create_label();
        self.export(name, &mut label)
    }
}

impl From<iced_x86::IcedError> for LinkError {
    /// Emitters use `?` on iced-x86 calls; the linker fills in the section name.
    fn from(e: iced_x86::IcedError) -> Self {
        LinkError::Assemble {
            section: "",
            message: e.to_string(),
        }
    }
}

impl LinkError {
    fn in_section(self, name: &'static str) -> Self {
        match self {
            LinkError::Assemble {
                section: "",
                message,
            } => LinkError::Assemble {
                section: name,
                message,
            },
            other => other,
        }
    }
}

/// Converts an iced-x86 error, naming the section.
pub(crate) fn assemble_error(section: &'static str, e: iced_x86::IcedError) -> LinkError {
    LinkError::Assemble {
        section,
        message: e.to_string(),
    }
}

/// Emits a section's contents.
pub(crate) type Emit<'e> = dyn Fn(&mut SectionAsm<'_>) -> Result<(), LinkError> + 'e;

/// One piece of an image.
pub(crate) struct Section<'e> {
    /// Name for messages.
    pub name: &'static str,
    /// 16, 32 or 64.
    pub bitness: u32,
    /// Alignment of the first byte (a power of two).
    pub align: u64,
    /// The section must end at or below this address (e.g. 0x10000 for real-mode code).
    pub limit: Option<u64>,
    /// Fills the section.
    pub emit: &'e Emit<'e>,
}

/// A linked image: bytes starting at `base`, and where every exported symbol ended up.
#[derive(Debug, Clone)]
pub(crate) struct Linked {
    /// The image's bytes.
    pub bytes: Vec<u8>,
    /// Exported symbols and their addresses (tests inspect them).
    #[cfg_attr(not(test), allow(dead_code))]
    pub symbols: BTreeMap<String, u64>,
}

const MAX_PASSES: usize = 8;

/// Lays out `sections` from `base` and assembles them until addresses are stable.
pub(crate) fn link(base: u64, sections: &[Section<'_>]) -> Result<Linked, LinkError> {
    let mut symbols: BTreeMap<String, u64> = BTreeMap::new();
    for pass in 0..MAX_PASSES {
        let (bytes, new_symbols, used) = link_pass(base, sections, &symbols)?;
        let stable = pass > 0 && new_symbols == symbols;
        symbols = new_symbols;
        if stable {
            for (section, name) in used {
                if !symbols.contains_key(&name) {
                    return Err(LinkError::UndefinedSymbol {
                        section,
                        symbol: name,
                    });
                }
            }
            return Ok(Linked { bytes, symbols });
        }
    }
    Err(LinkError::NoFixedPoint { passes: MAX_PASSES })
}

type PassResult = (Vec<u8>, BTreeMap<String, u64>, Vec<(&'static str, String)>);

fn link_pass(
    base: u64,
    sections: &[Section<'_>],
    previous: &BTreeMap<String, u64>,
) -> Result<PassResult, LinkError> {
    let mut bytes = Vec::new();
    let mut symbols = BTreeMap::new();
    let mut used = Vec::new();
    for section in sections {
        let name = section.name;
        let here = base + bytes.len() as u64;
        let addr = here.next_multiple_of(section.align.max(1));
        bytes.resize((addr - base) as usize, 0);
        let mut s = SectionAsm {
            a: CodeAssembler::new(section.bitness).map_err(|e| assemble_error(name, e))?,
            name,
            previous,
            used: BTreeSet::new(),
            exports: Vec::new(),
        };
        (section.emit)(&mut s).map_err(|e| e.in_section(name))?;
        let result =
            s.a.assemble_options(addr, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
                .map_err(|e| assemble_error(name, e))?;
        for (symbol, label) in &s.exports {
            let ip = result
                .label_ip(label)
                .map_err(|e| assemble_error(name, e))?;
            if symbols.insert(symbol.clone(), ip).is_some() {
                return Err(LinkError::DuplicateSymbol {
                    section: name,
                    symbol: symbol.clone(),
                });
            }
        }
        let code = &result.inner.code_buffer;
        let end = addr + code.len() as u64;
        if let Some(limit) = section.limit
            && end > limit
        {
            return Err(LinkError::SectionTooHigh {
                section: name,
                end,
                limit,
            });
        }
        bytes.extend_from_slice(code);
        used.extend(s.used.into_iter().map(|u| (name, u)));
    }
    Ok((bytes, symbols, used))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_section_far_jump_resolves_to_the_exported_address() {
        let real: &Emit = &|s| {
            let target = s.sym32("target");
            Ok(s.a.jmp_far(0x08, target)?)
        };
        let prot: &Emit = &|s| {
            s.export_here("target")?;
            Ok(s.a.hlt()?)
        };
        let linked = link(
            0x7c00,
            &[
                Section {
                    name: "a",
                    bitness: 16,
                    align: 1,
                    limit: Some(0x1_0000),
                    emit: real,
                },
                Section {
                    name: "b",
                    bitness: 32,
                    align: 16,
                    limit: None,
                    emit: prot,
                },
            ],
        )
        .unwrap();
        assert_eq!(linked.symbols["target"], 0x7c10);
        // EA iw(offset) iw(selector) in 16-bit code.
        assert_eq!(&linked.bytes[..5], &[0xea, 0x10, 0x7c, 0x08, 0x00]);
        assert_eq!(linked.bytes[0x10], 0xf4);
    }

    #[test]
    fn undefined_symbols_are_reported_with_their_user() {
        let emit: &Emit = &|s| {
            let t = s.sym32("nowhere");
            Ok(s.a.jmp_far(0x08, t)?)
        };
        let err = link(
            0,
            &[Section {
                name: "a",
                bitness: 16,
                align: 1,
                limit: None,
                emit,
            }],
        )
        .unwrap_err();
        assert!(
            matches!(&err, LinkError::UndefinedSymbol { section: "a", symbol } if symbol == "nowhere"),
            "{err}"
        );
    }
}
