//! QEMU's firmware configuration interface ("fw_cfg") on the x86 I/O ports: a 16-bit item
//! selector at 0x510, a byte-wide data port at 0x511, and the DMA interface at 0x514.
//!
//! Firmware and kernels read the machine's description from it: the "QEMU" signature, the
//! interface ID (with the DMA feature bit), RAM size, CPU count, the kernel command line and
//! a directory of named files (`etc/e820`, ...). Port accesses follow QEMU's combined
//! ctl/data region: a 16-bit write selects an item, a byte read returns the next byte of the
//! selected item (zero past its end). The DMA interface takes the big-endian guest-physical
//! address of a 16-byte control structure (big-endian `control`, `length`, `address`) and
//! performs select/read/skip/write on guest memory, reporting failure with the error bit.

use super::{Device, DeviceError, DeviceState, IoCtx};
use crate::machine::MachineConfig;
use crate::memory::{DmaMemory, MemoryLayout};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The selector port (also a data port for byte reads, as QEMU's combined region).
pub const PORT_SELECTOR: u16 = 0x510;
/// The data port.
pub const PORT_DATA: u16 = 0x511;
/// The DMA address register (big-endian, high dword at 0x514, low dword at 0x518).
pub const PORT_DMA: u16 = 0x514;
/// Ports of the selector/data region `(start, len)`.
pub const PIO_RANGE: (u16, u16) = (PORT_SELECTOR, 2);
/// Ports of the DMA region `(start, len)`.
pub const DMA_RANGE: (u16, u16) = (PORT_DMA, 8);

/// What reading the DMA register returns: "QEMU CFG" in memory order.
pub const DMA_SIGNATURE: [u8; 8] = *b"QEMU CFG";

/// Item keys (QEMU's `FW_CFG_*`).
pub mod key {
    /// "QEMU".
    pub const SIGNATURE: u16 = 0x00;
    /// Interface ID: bit 0 traditional interface, bit 1 DMA.
    pub const ID: u16 = 0x01;
    /// Machine UUID (16 bytes).
    pub const UUID: u16 = 0x02;
    /// RAM size in bytes (u64 little-endian).
    pub const RAM_SIZE: u16 = 0x03;
    /// Whether the machine has no graphical console (u16).
    pub const NOGRAPHIC: u16 = 0x04;
    /// CPUs present at boot (u16).
    pub const NB_CPUS: u16 = 0x05;
    /// Whether firmware shows a boot menu (u16).
    pub const BOOT_MENU: u16 = 0x0e;
    /// Maximum CPUs (u16).
    pub const MAX_CPUS: u16 = 0x0f;
    /// Kernel command line length including its NUL (u32).
    pub const CMDLINE_SIZE: u16 = 0x14;
    /// Kernel command line, NUL-terminated.
    pub const CMDLINE_DATA: u16 = 0x15;
    /// The file directory (big-endian count, then 64-byte entries).
    pub const FILE_DIR: u16 = 0x19;
    /// Key of the first file; files follow in name order.
    pub const FILE_FIRST: u16 = 0x20;
    /// Set on keys of architecture-specific items.
    pub const ARCH_LOCAL: u16 = 0x8000;
    /// Legacy write channel bit (ignored when selecting, as QEMU does).
    pub const WRITE_CHANNEL: u16 = 0x4000;
    /// Whether the PIT's IRQ 0 is overridden to GSI 2 (u32).
    pub const IRQ0_OVERRIDE: u16 = ARCH_LOCAL | 0x02;
}

/// Bits of the DMA control word.
pub mod dma {
    /// Set by the device when the transfer failed.
    pub const ERROR: u32 = 1 << 0;
    /// Copy from the item to guest memory.
    pub const READ: u32 = 1 << 1;
    /// Advance the item offset without copying.
    pub const SKIP: u32 = 1 << 2;
    /// Select the item in the control word's high 16 bits first.
    pub const SELECT: u32 = 1 << 3;
    /// Copy from guest memory into a writable item.
    pub const WRITE: u32 = 1 << 4;
}

/// The ID item's value: traditional interface and DMA.
pub const ID_FEATURES: u32 = 0b11;
/// Longest file name, without its NUL.
pub const MAX_FILE_NAME: usize = 55;
/// Most files the directory holds.
pub const MAX_FILES: usize = 0x4000 - key::FILE_FIRST as usize;

/// Failures building the item set.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FwCfgError {
    /// A file name does not fit the directory entry.
    #[error("fw_cfg file name {name:?} is {len} bytes; at most {MAX_FILE_NAME} fit")]
    NameTooLong {
        /// The name.
        name: String,
        /// Its length in bytes.
        len: usize,
    },
    /// A file with this name already exists.
    #[error("fw_cfg already has a file named {name:?}")]
    DuplicateFile {
        /// The name.
        name: String,
    },
    /// The directory is full.
    #[error("fw_cfg directory is full ({MAX_FILES} files)")]
    TooManyFiles,
    /// An item is larger than its 32-bit size field can describe.
    #[error("fw_cfg item {name:?} is {len} bytes, more than a 32-bit size can describe")]
    TooLarge {
        /// The item.
        name: String,
        /// Its length.
        len: usize,
    },
}

/// One item's contents.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Item {
    data: Vec<u8>,
    writable: bool,
}

/// A named file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct File {
    name: String,
    item: Item,
}

/// Saved state of fw_cfg: the selection, the offset in it, the DMA register half written,
/// and the contents of writable items (everything else follows from the configuration).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FwCfgState {
    /// The selected key (write-channel bit removed), `None` before any selection.
    pub selected: Option<u16>,
    /// Offset of the next byte to read in the selected item.
    pub offset: u32,
    /// The DMA address as written so far.
    pub dma_addr: u64,
    /// Writable items' contents, by key.
    pub writable: Vec<(u16, Vec<u8>)>,
}

/// The fw_cfg device.
#[derive(Debug)]
pub struct FwCfg {
    /// Numbered items, by key (files excluded).
    items: Vec<(u16, Item)>,
    /// Files in name order; file `i` has key `FILE_FIRST + i`.
    files: Vec<File>,
    selected: Option<u16>,
    offset: u32,
    dma_addr: u64,
}

fn u16le(v: u16) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

fn u32le(v: u32) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

impl FwCfg {
    /// The items QEMU's `pc` machine provides, from the machine's configuration: signature,
    /// ID, UUID, RAM size, one CPU, the kernel command line, the IRQ0 override and
    /// `etc/e820` describing RAM as QEMU does (below 4 GiB from 0, and above 4 GiB).
    pub fn new(config: &MachineConfig, layout: &MemoryLayout) -> Self {
        let mut cmdline = config.cmdline.as_bytes().to_vec();
        cmdline.push(0);
        let plain = |data: Vec<u8>| Item {
            data,
            writable: false,
        };
        let items = vec![
            (key::SIGNATURE, plain(b"QEMU".to_vec())),
            (key::ID, plain(u32le(ID_FEATURES))),
            (key::UUID, plain(vec![0; 16])),
            (key::RAM_SIZE, plain(config.ram_size.to_le_bytes().to_vec())),
            (key::NOGRAPHIC, plain(u16le(1))),
            (key::NB_CPUS, plain(u16le(1))),
            (key::BOOT_MENU, plain(u16le(0))),
            (key::MAX_CPUS, plain(u16le(1))),
            (key::CMDLINE_SIZE, plain(u32le(cmdline.len() as u32))),
            (key::CMDLINE_DATA, plain(cmdline)),
            (key::IRQ0_OVERRIDE, plain(u32le(1))),
        ];
        let mut fw = Self {
            items,
            files: Vec::new(),
            selected: None,
            offset: 0,
            dma_addr: 0,
        };
        let mut e820 = Vec::new();
        let mut entry = |addr: u64, len: u64| {
            e820.extend_from_slice(&addr.to_le_bytes());
            e820.extend_from_slice(&len.to_le_bytes());
            e820.extend_from_slice(&1u32.to_le_bytes()); // E820_RAM
        };
        entry(0, layout.below_4g);
        if layout.above_4g > 0 {
            entry(crate::memory::FOUR_GIB, layout.above_4g);
        }
        fw.add_file("etc/e820", e820, false)
            .expect("a fresh directory takes etc/e820");
        fw
    }

    /// Adds a named file (kept in name order, as QEMU does) and returns the key it has now.
    /// Adding a file renumbers the files after it, so add all files before the guest runs.
    pub fn add_file(
        &mut self,
        name: &str,
        data: Vec<u8>,
        writable: bool,
    ) -> Result<u16, FwCfgError> {
        if name.len() > MAX_FILE_NAME {
            return Err(FwCfgError::NameTooLong {
                name: name.to_string(),
                len: name.len(),
            });
        }
        if u32::try_from(data.len()).is_err() {
            return Err(FwCfgError::TooLarge {
                name: name.to_string(),
                len: data.len(),
            });
        }
        if self.files.len() >= MAX_FILES {
            return Err(FwCfgError::TooManyFiles);
        }
        let at = match self.files.binary_search_by(|f| f.name.as_str().cmp(name)) {
            Ok(_) => {
                return Err(FwCfgError::DuplicateFile {
                    name: name.to_string(),
                });
            }
            Err(at) => at,
        };
        self.files.insert(
            at,
            File {
                name: name.to_string(),
                item: Item { data, writable },
            },
        );
        Ok(key::FILE_FIRST + at as u16)
    }

    /// The key of the file `name`, if present.
    pub fn file_key(&self, name: &str) -> Option<u16> {
        self.files
            .iter()
            .position(|f| f.name == name)
            .map(|i| key::FILE_FIRST + i as u16)
    }

    /// The directory item: big-endian count, then per file a big-endian size, key, a
    /// reserved u16 and a 56-byte NUL-padded name.
    fn directory(&self) -> Vec<u8> {
        let mut d = (self.files.len() as u32).to_be_bytes().to_vec();
        for (i, f) in self.files.iter().enumerate() {
            d.extend_from_slice(&(f.item.data.len() as u32).to_be_bytes());
            d.extend_from_slice(&(key::FILE_FIRST + i as u16).to_be_bytes());
            d.extend_from_slice(&[0, 0]);
            let mut name = [0u8; MAX_FILE_NAME + 1];
            name[..f.name.len()].copy_from_slice(f.name.as_bytes());
            d.extend_from_slice(&name);
        }
        d
    }

    /// A copy of the item `k` (the directory is built on demand).
    fn item_data(&self, k: u16) -> Option<std::borrow::Cow<'_, [u8]>> {
        if k == key::FILE_DIR {
            return Some(self.directory().into());
        }
        self.item(k).map(|i| i.data.as_slice().into())
    }

    fn item(&self, k: u16) -> Option<&Item> {
        if (key::FILE_FIRST..key::WRITE_CHANNEL).contains(&k) {
            return self
                .files
                .get(usize::from(k - key::FILE_FIRST))
                .map(|f| &f.item);
        }
        self.items.iter().find(|(ik, _)| *ik == k).map(|(_, i)| i)
    }

    fn item_mut(&mut self, k: u16) -> Option<&mut Item> {
        if (key::FILE_FIRST..key::WRITE_CHANNEL).contains(&k) {
            return self
                .files
                .get_mut(usize::from(k - key::FILE_FIRST))
                .map(|f| &mut f.item);
        }
        self.items
            .iter_mut()
            .find(|(ik, _)| *ik == k)
            .map(|(_, i)| i)
    }

    fn select(&mut self, k: u16) {
        self.selected = Some(k & !key::WRITE_CHANNEL);
        self.offset = 0;
    }

    /// The next byte of the selected item through the data port (0 past the end).
    fn read_data_byte(&mut self) -> u8 {
        let Some(k) = self.selected else { return 0 };
        let offset = self.offset as usize;
        let byte = self.item_data(k).and_then(|d| d.get(offset).copied());
        match byte {
            Some(b) => {
                self.offset += 1;
                b
            }
            None => 0,
        }
    }

    /// Runs the DMA request whose control structure is at `desc`.
    fn dma_transfer(&mut self, mem: DmaMemory, desc: u64) {
        let mut raw = [0u8; 16];
        if mem.read(&mut raw, desc).is_err() {
            // Nothing sensible to report into; try to flag the error where the guest looks.
            let _ = mem.write(&dma::ERROR.to_be_bytes(), desc);
            return;
        }
        let control = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let mut length = u32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]]);
        let mut address = u64::from_be_bytes([
            raw[8], raw[9], raw[10], raw[11], raw[12], raw[13], raw[14], raw[15],
        ]);
        if control & dma::SELECT != 0 {
            self.select((control >> 16) as u16);
        }
        let (read, write) = if control & dma::READ != 0 {
            (true, false)
        } else if control & dma::WRITE != 0 {
            (false, true)
        } else if control & dma::SKIP != 0 {
            (false, false)
        } else {
            length = 0;
            (false, false)
        };
        let mut status = 0u32;
        while length > 0 && status & dma::ERROR == 0 {
            let offset = self.offset as usize;
            let available = self
                .selected
                .and_then(|k| self.item_data(k).map(|d| d.len()))
                .filter(|&n| offset < n);
            let len = match available {
                None => {
                    // Past the end (or nothing selected): reads see zeros, writes fail.
                    let len = length;
                    if read && !zero_fill(mem, address, u64::from(len)) {
                        status |= dma::ERROR;
                    }
                    if write {
                        status |= dma::ERROR;
                    }
                    len
                }
                Some(n) => {
                    let len = length.min((n - offset) as u32);
                    let range = offset..offset + len as usize;
                    if read {
                        let data = self.selected.and_then(|k| self.item_data(k));
                        let ok =
                            data.is_some_and(|d| mem.write(&d[range.clone()], address).is_ok());
                        if !ok {
                            status |= dma::ERROR;
                        }
                    }
                    if write && !self.dma_write(mem, address, range, len == length) {
                        status |= dma::ERROR;
                    }
                    self.offset += len;
                    len
                }
            };
            address = address.wrapping_add(u64::from(len));
            length -= len;
        }
        let _ = mem.write(&status.to_be_bytes(), desc);
    }

    /// A DMA write into the selected item; fails unless the item is writable and the whole
    /// request fits in it (QEMU's rule).
    fn dma_write(
        &mut self,
        mem: DmaMemory,
        address: u64,
        range: std::ops::Range<usize>,
        whole: bool,
    ) -> bool {
        let Some(k) = self.selected else { return false };
        if k == key::FILE_DIR || !whole {
            return false;
        }
        let mut buf = vec![0u8; range.len()];
        if mem.read(&mut buf, address).is_err() {
            return false;
        }
        match self.item_mut(k) {
            Some(item) if item.writable => {
                item.data[range].copy_from_slice(&buf);
                true
            }
            _ => false,
        }
    }

    fn writable_items(&self) -> Vec<(u16, Vec<u8>)> {
        let numbered = self.items.iter().map(|(k, i)| (*k, i));
        let files = self
            .files
            .iter()
            .enumerate()
            .map(|(n, f)| (key::FILE_FIRST + n as u16, &f.item));
        numbered
            .chain(files)
            .filter(|(_, i)| i.writable)
            .map(|(k, i)| (k, i.data.clone()))
            .collect()
    }
}

/// Writes `len` zero bytes at `address`, a page at a time; false if any part is neither RAM
/// nor ROM.
fn zero_fill(mem: DmaMemory, address: u64, len: u64) -> bool {
    const CHUNK: u64 = 4096;
    if address.checked_add(len).is_none() {
        return false;
    }
    let zeros = [0u8; CHUNK as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK);
        if mem.write(&zeros[..n as usize], address + done).is_err() {
            return false;
        }
        done += n;
    }
    true
}

impl Device for FwCfg {
    fn name(&self) -> &'static str {
        "fw_cfg"
    }

    fn read(&mut self, _ctx: &mut IoCtx, addr: u64, data: &mut [u8]) {
        let port = addr as u16;
        match port {
            PORT_SELECTOR | PORT_DATA if data.len() == 1 => data[0] = self.read_data_byte(),
            PORT_DMA..=0x51b => {
                let at = usize::from(port - PORT_DMA);
                for (i, b) in data.iter_mut().enumerate() {
                    *b = DMA_SIGNATURE.get(at + i).copied().unwrap_or(0xff);
                }
            }
            // QEMU's combined region only accepts byte reads.
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, ctx: &mut IoCtx, addr: u64, data: &[u8]) {
        let port = addr as u16;
        match (port, data.len()) {
            // A 16-bit write selects; byte writes to the data port are ignored (QEMU no
            // longer supports writes through the traditional interface).
            (PORT_SELECTOR | PORT_DATA, 2) => self.select(u16::from_le_bytes([data[0], data[1]])),
            (PORT_DMA, 4) => {
                let high = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                self.dma_addr = u64::from(high) << 32;
            }
            (0x518, 4) => {
                let low = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                let desc = self.dma_addr | u64::from(low);
                self.dma_addr = 0;
                self.dma_transfer(ctx.mem, desc);
            }
            (PORT_DMA, 8) => {
                let mut b = [0u8; 8];
                b.copy_from_slice(data);
                self.dma_addr = 0;
                self.dma_transfer(ctx.mem, u64::from_be_bytes(b));
            }
            _ => {}
        }
    }

    fn save(&self) -> DeviceState {
        DeviceState::FwCfg(FwCfgState {
            selected: self.selected,
            offset: self.offset,
            dma_addr: self.dma_addr,
            writable: self.writable_items(),
        })
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
        let DeviceState::FwCfg(s) = state else {
            return Err(DeviceError::WrongState {
                device: "fw_cfg",
                found: state.kind(),
            });
        };
        let mine = self.writable_items();
        let fits = mine.len() == s.writable.len()
            && mine
                .iter()
                .zip(&s.writable)
                .all(|((k, d), (sk, sd))| k == sk && d.len() == sd.len());
        if !fits {
            return Err(DeviceError::InvalidState {
                device: "fw_cfg",
                detail: format!(
                    "saved writable items {:?} do not match this machine's {:?}",
                    s.writable
                        .iter()
                        .map(|(k, d)| (*k, d.len()))
                        .collect::<Vec<_>>(),
                    mine.iter().map(|(k, d)| (*k, d.len())).collect::<Vec<_>>()
                ),
            });
        }
        for (k, d) in &s.writable {
            if let Some(item) = self.item_mut(*k) {
                item.data.clone_from(d);
            }
        }
        self.selected = s.selected;
        self.offset = s.offset;
        self.dma_addr = s.dma_addr;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::scripted_host::Rig;
    use vm_memory::{Bytes, GuestAddress};

    const RAM: u64 = 16 << 20;

    fn setup(cmdline: &str) -> (FwCfg, Rig) {
        let rig = Rig::new(RAM);
        let config = MachineConfig {
            ram_size: RAM,
            cmdline: cmdline.to_string(),
            ..MachineConfig::default()
        };
        (FwCfg::new(&config, &rig.layout), rig)
    }

    fn port_read(fw: &mut FwCfg, rig: &mut Rig, k: u16, len: usize) -> Vec<u8> {
        fw.write(&mut rig.ctx(), 0x510, &k.to_le_bytes());
        (0..len)
            .map(|_| {
                let mut b = [0u8];
                fw.read(&mut rig.ctx(), 0x511, &mut b);
                b[0]
            })
            .collect()
    }

    /// Writes a DMA descriptor at `desc` and triggers it through the two dword registers.
    fn dma(fw: &mut FwCfg, rig: &mut Rig, desc: u64, control: u32, len: u32, addr: u64) -> u32 {
        let mut raw = control.to_be_bytes().to_vec();
        raw.extend_from_slice(&len.to_be_bytes());
        raw.extend_from_slice(&addr.to_be_bytes());
        rig.mem.write_slice(&raw, GuestAddress(desc)).unwrap();
        fw.write(&mut rig.ctx(), 0x514, &((desc >> 32) as u32).to_be_bytes());
        fw.write(&mut rig.ctx(), 0x518, &(desc as u32).to_be_bytes());
        let mut c = [0u8; 4];
        rig.mem.read_slice(&mut c, GuestAddress(desc)).unwrap();
        u32::from_be_bytes(c)
    }

    fn guest(rig: &Rig, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        rig.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    #[test]
    fn items_read_through_the_ports() {
        let (mut fw, mut rig) = setup("console=ttyS0 quiet");
        let cases: Vec<(u16, Vec<u8>)> = vec![
            (key::SIGNATURE, b"QEMU".to_vec()),
            (key::ID, vec![3, 0, 0, 0]),
            (key::RAM_SIZE, RAM.to_le_bytes().to_vec()),
            (key::NB_CPUS, vec![1, 0]),
            (key::MAX_CPUS, vec![1, 0]),
            (key::CMDLINE_SIZE, vec![20, 0, 0, 0]),
            (key::CMDLINE_DATA, b"console=ttyS0 quiet\0".to_vec()),
            (key::IRQ0_OVERRIDE, vec![1, 0, 0, 0]),
            // The write-channel bit is ignored when selecting.
            (key::WRITE_CHANNEL | key::ID, vec![3, 0, 0, 0]),
        ];
        for (k, want) in cases {
            let got = port_read(&mut fw, &mut rig, k, want.len() + 2);
            assert_eq!(&got[..want.len()], &want[..], "key {k:#x}");
            assert_eq!(&got[want.len()..], &[0, 0], "key {k:#x} past its end");
        }
        // Unknown keys read as zeros.
        assert_eq!(port_read(&mut fw, &mut rig, 0x1234, 3), vec![0, 0, 0]);
        // Byte reads at 0x510 are data reads too; wider reads are invalid.
        fw.write(&mut rig.ctx(), 0x510, &key::SIGNATURE.to_le_bytes());
        let mut b = [0u8];
        fw.read(&mut rig.ctx(), 0x510, &mut b);
        assert_eq!(b[0], b'Q');
        let mut w = [0u8; 2];
        fw.read(&mut rig.ctx(), 0x511, &mut w);
        assert_eq!(w, [0xff, 0xff]);
        fw.read(&mut rig.ctx(), 0x511, &mut b);
        assert_eq!(b[0], b'E', "the invalid read did not advance");
    }

    #[test]
    fn empty_command_line_is_a_lone_nul() {
        let (mut fw, mut rig) = setup("");
        assert_eq!(
            port_read(&mut fw, &mut rig, key::CMDLINE_SIZE, 4),
            vec![1, 0, 0, 0]
        );
        assert_eq!(
            port_read(&mut fw, &mut rig, key::CMDLINE_DATA, 2),
            vec![0, 0]
        );
    }

    /// Parses a directory into (name, size, key).
    fn parse_dir(d: &[u8]) -> Vec<(String, u32, u16)> {
        let count = u32::from_be_bytes(d[0..4].try_into().unwrap()) as usize;
        assert_eq!(d.len(), 4 + 64 * count);
        (0..count)
            .map(|i| {
                let e = &d[4 + 64 * i..4 + 64 * (i + 1)];
                let size = u32::from_be_bytes(e[0..4].try_into().unwrap());
                let k = u16::from_be_bytes(e[4..6].try_into().unwrap());
                let name_end = e[8..].iter().position(|&b| b == 0).unwrap();
                (
                    String::from_utf8(e[8..8 + name_end].to_vec()).unwrap(),
                    size,
                    k,
                )
            })
            .collect()
    }

    #[test]
    fn file_directory_is_sorted_and_points_at_the_files() {
        let (mut fw, mut rig) = setup("");
        fw.add_file("opt/zzz", vec![9; 3], false).unwrap();
        fw.add_file("bootorder", b"/rom@genroms\0".to_vec(), false)
            .unwrap();
        let count = u32::from_be_bytes(
            port_read(&mut fw, &mut rig, key::FILE_DIR, 4)
                .try_into()
                .unwrap(),
        );
        assert_eq!(count, 3);
        let dir = port_read(&mut fw, &mut rig, key::FILE_DIR, 4 + 64 * 3);
        let files = parse_dir(&dir);
        assert_eq!(
            files,
            vec![
                ("bootorder".to_string(), 13, 0x20),
                ("etc/e820".to_string(), 20, 0x21),
                ("opt/zzz".to_string(), 3, 0x22),
            ]
        );
        assert_eq!(fw.file_key("etc/e820"), Some(0x21));
        // etc/e820: one RAM entry from 0 to the top of low memory.
        let e820 = port_read(&mut fw, &mut rig, 0x21, 20);
        assert_eq!(u64::from_le_bytes(e820[0..8].try_into().unwrap()), 0);
        assert_eq!(u64::from_le_bytes(e820[8..16].try_into().unwrap()), RAM);
        assert_eq!(u32::from_le_bytes(e820[16..20].try_into().unwrap()), 1);
        assert_eq!(port_read(&mut fw, &mut rig, 0x22, 4), vec![9, 9, 9, 0]);
    }

    #[test]
    fn e820_above_4g() {
        let layout = MemoryLayout::pc(4 << 30).unwrap();
        let fw = FwCfg::new(&MachineConfig::default(), &layout);
        let k = fw.file_key("etc/e820").unwrap();
        let d = fw.item_data(k).unwrap().to_vec();
        assert_eq!(d.len(), 40);
        assert_eq!(
            u64::from_le_bytes(d[8..16].try_into().unwrap()),
            0xc000_0000
        );
        assert_eq!(u64::from_le_bytes(d[20..28].try_into().unwrap()), 1 << 32);
        assert_eq!(u64::from_le_bytes(d[28..36].try_into().unwrap()), 1 << 30);
    }

    #[test]
    fn add_file_rejects_bad_names() {
        let (mut fw, _) = setup("");
        assert!(matches!(
            fw.add_file("etc/e820", vec![], false),
            Err(FwCfgError::DuplicateFile { .. })
        ));
        let long = "x".repeat(56);
        assert!(matches!(
            fw.add_file(&long, vec![], false),
            Err(FwCfgError::NameTooLong { len: 56, .. })
        ));
        assert!(fw.add_file(&"y".repeat(55), vec![], false).is_ok());
    }

    #[test]
    fn dma_register_reads_the_signature() {
        let (mut fw, mut rig) = setup("");
        let mut q = [0u8; 4];
        fw.read(&mut rig.ctx(), 0x514, &mut q);
        assert_eq!(&q, b"QEMU");
        fw.read(&mut rig.ctx(), 0x518, &mut q);
        assert_eq!(&q, b" CFG");
        let mut b = [0u8];
        fw.read(&mut rig.ctx(), 0x515, &mut b);
        assert_eq!(b[0], b'E');
    }

    #[test]
    fn dma_select_read_skip() {
        let (mut fw, mut rig) = setup("root=/dev/sda");
        let desc = 0x1000;
        let buf = 0x2000;
        rig.mem.write_slice(&[0xaa; 32], GuestAddress(buf)).unwrap();
        // Select the signature and read 4 bytes.
        let c = dma(
            &mut fw,
            &mut rig,
            desc,
            u32::from(key::SIGNATURE) << 16 | dma::SELECT | dma::READ,
            4,
            buf,
        );
        assert_eq!(c, 0);
        assert_eq!(guest(&rig, buf, 5), b"QEMU\xaa");
        // Select the command line, skip 5, read the rest and beyond: zeros past the end.
        let sel = u32::from(key::CMDLINE_DATA) << 16 | dma::SELECT | dma::SKIP;
        assert_eq!(dma(&mut fw, &mut rig, desc, sel, 5, 0), 0);
        assert_eq!(dma(&mut fw, &mut rig, desc, dma::READ, 12, buf), 0);
        assert_eq!(guest(&rig, buf, 13), b"/dev/sda\0\0\0\0\xaa");
        // The DMA and port paths share the offset: after a DMA skip, the port continues.
        dma(
            &mut fw,
            &mut rig,
            desc,
            u32::from(key::ID) << 16 | dma::SELECT | dma::SKIP,
            1,
            0,
        );
        let mut b = [0u8];
        fw.read(&mut rig.ctx(), 0x511, &mut b);
        assert_eq!(b[0], 0, "second byte of ID 3");
        // The ID has the DMA bit.
        dma(
            &mut fw,
            &mut rig,
            desc,
            u32::from(key::ID) << 16 | dma::SELECT | dma::READ,
            4,
            buf,
        );
        assert_eq!(guest(&rig, buf, 4), ID_FEATURES.to_le_bytes());
        // No operation bit: nothing moves, no error.
        rig.mem.write_slice(&[0x55; 4], GuestAddress(buf)).unwrap();
        assert_eq!(dma(&mut fw, &mut rig, desc, 0, 4, buf), 0);
        assert_eq!(guest(&rig, buf, 4), vec![0x55; 4]);
        // A single 8-byte write of the address triggers too.
        let mut raw = (u32::from(key::SIGNATURE) << 16 | dma::SELECT | dma::READ)
            .to_be_bytes()
            .to_vec();
        raw.extend_from_slice(&2u32.to_be_bytes());
        raw.extend_from_slice(&buf.to_be_bytes());
        rig.mem.write_slice(&raw, GuestAddress(desc)).unwrap();
        fw.write(&mut rig.ctx(), 0x514, &desc.to_be_bytes());
        assert_eq!(guest(&rig, buf, 3), b"QE\x55");
        assert_eq!(guest(&rig, desc, 4), vec![0; 4]);
    }

    #[test]
    fn dma_write_needs_a_writable_item_and_a_whole_fit() {
        let (mut fw, mut rig) = setup("");
        let k = fw.add_file("etc/scratch", vec![0; 8], true).unwrap();
        let (desc, buf) = (0x1000, 0x2000);
        rig.mem
            .write_slice(b"abcdefghij", GuestAddress(buf))
            .unwrap();
        let sel = u32::from(k) << 16 | dma::SELECT;
        assert_eq!(dma(&mut fw, &mut rig, desc, sel | dma::WRITE, 4, buf), 0);
        assert_eq!(dma(&mut fw, &mut rig, desc, dma::WRITE, 2, buf + 4), 0);
        assert_eq!(port_read(&mut fw, &mut rig, k, 8), b"abcdef\0\0");
        // Writing beyond the end fails and changes nothing past the fit.
        assert_eq!(dma(&mut fw, &mut rig, desc, sel | dma::SKIP, 6, 0), 0);
        assert_eq!(dma(&mut fw, &mut rig, desc, dma::WRITE, 4, buf), dma::ERROR);
        assert_eq!(port_read(&mut fw, &mut rig, k, 8), b"abcdef\0\0");
        // Read-only items refuse writes.
        let ro = u32::from(key::SIGNATURE) << 16 | dma::SELECT | dma::WRITE;
        assert_eq!(dma(&mut fw, &mut rig, desc, ro, 4, buf), dma::ERROR);
        assert_eq!(port_read(&mut fw, &mut rig, key::SIGNATURE, 4), b"QEMU");
        // Save/restore carries the written contents.
        let saved = fw.save();
        let (mut other, _) = setup("");
        other.add_file("etc/scratch", vec![0; 8], true).unwrap();
        other.restore(&saved).unwrap();
        assert_eq!(other.save(), saved);
        assert_eq!(port_read(&mut other, &mut rig, k, 8), b"abcdef\0\0");
    }

    #[test]
    fn malformed_dma_requests_set_the_error_bit_without_panicking() {
        let (mut fw, mut rig) = setup("");
        let desc = 0x1000;
        let read_sig = u32::from(key::SIGNATURE) << 16 | dma::SELECT | dma::READ;
        // (length, destination): into the VGA hole, past the end of RAM, wrapping around.
        let cases: &[(u32, u64)] = &[
            (4, 0xa_0000),
            (4, RAM - 2),
            (4, u64::MAX - 1),
            (0xffff_ffff, 0x3000),
            (0x10, u64::MAX - 4),
        ];
        for &(len, dest) in cases {
            assert_eq!(
                dma(&mut fw, &mut rig, desc, read_sig, len, dest) & dma::ERROR,
                dma::ERROR,
                "len {len:#x} to {dest:#x}"
            );
        }
        // A descriptor that is not in RAM, or wraps: nothing to report into, no panic.
        for d in [0xa_0000u64, u64::MAX - 8, RAM - 8] {
            fw.write(&mut rig.ctx(), 0x514, &((d >> 32) as u32).to_be_bytes());
            fw.write(&mut rig.ctx(), 0x518, &(d as u32).to_be_bytes());
        }
        // The interface still works afterwards.
        assert_eq!(dma(&mut fw, &mut rig, desc, read_sig, 4, 0x2000), 0);
        assert_eq!(guest(&rig, 0x2000, 4), b"QEMU");
    }

    #[test]
    fn save_restore_round_trip_mid_item() {
        let (mut fw, mut rig) = setup("abc");
        assert_eq!(port_read(&mut fw, &mut rig, key::CMDLINE_DATA, 1), b"a");
        fw.write(&mut rig.ctx(), 0x514, &0x1u32.to_be_bytes());
        let saved = fw.save();
        let (mut other, mut rig2) = setup("abc");
        other.restore(&saved).unwrap();
        assert_eq!(other.save(), saved);
        let mut b = [0u8];
        other.read(&mut rig2.ctx(), 0x511, &mut b);
        assert_eq!(b[0], b'b');
        assert!(other.restore(&DeviceState::DebugExit).is_err());
        let mut bad = match saved {
            DeviceState::FwCfg(s) => s,
            _ => unreachable!(),
        };
        bad.writable.push((0x30, vec![1]));
        assert!(other.restore(&DeviceState::FwCfg(bad)).is_err());
    }
}
