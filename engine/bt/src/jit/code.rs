//! Executable memory for tier-1 code: chunks mapped once and shared by the blocks compiled
//! into them; a chunk is unmapped when the last block using it is dropped and the allocator
//! has moved on to a newer chunk.

use std::sync::Arc;

/// Size of one chunk of executable memory.
const CHUNK_BYTES: usize = 1 << 20;

/// One mapping of executable memory.
#[derive(Debug)]
struct Chunk {
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by the chunk; it is written only while the
// allocator places code in it (through `&mut CodeMemory`) and otherwise only executed.
unsafe impl Send for Chunk {}
// SAFETY: as above: shared references only execute or read it.
unsafe impl Sync for Chunk {}

impl Drop for Chunk {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly the mapping made in `Chunk::map`, and no compiled
        // block refers to it any more (each holds an `Arc` of its chunk).
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

impl Chunk {
    fn map(len: usize) -> Option<Chunk> {
        // SAFETY: an anonymous private mapping; no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        (p != libc::MAP_FAILED).then(|| Chunk {
            base: p.cast(),
            len,
        })
    }
}

/// A placed piece of code: its entry address, kept alive with its chunk.
#[derive(Debug, Clone)]
pub struct CodeRef {
    entry: usize,
    _chunk: Arc<Chunk>,
}

impl CodeRef {
    /// The address of the first byte.
    pub fn entry(&self) -> usize {
        self.entry
    }
}

/// The allocator: a bump pointer in the newest chunk.
#[derive(Debug, Default)]
pub struct CodeMemory {
    current: Option<Arc<Chunk>>,
    used: usize,
    /// Bytes placed so far (for statistics).
    pub placed_bytes: u64,
}

impl CodeMemory {
    /// Copies `bytes` (position-independent code) into executable memory; `None` if the
    /// host refuses an executable mapping.
    pub fn place(&mut self, bytes: &[u8]) -> Option<CodeRef> {
        let fits = |c: &Arc<Chunk>, used: usize| used + bytes.len() <= c.len;
        if !self.current.as_ref().is_some_and(|c| fits(c, self.used)) {
            self.current = Some(Arc::new(Chunk::map(CHUNK_BYTES.max(bytes.len()))?));
            self.used = 0;
        }
        let chunk = self.current.as_ref()?;
        // SAFETY: `used + len <= chunk.len` (checked above), so the copy stays inside the
        // mapping, in bytes no other code occupies; nothing executes them before this returns.
        let at = unsafe { chunk.base.add(self.used) };
        // SAFETY: as above; source and destination do not overlap (one is a Rust slice).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), at, bytes.len()) };
        self.used += bytes.len().next_multiple_of(16);
        self.placed_bytes += bytes.len() as u64;
        Some(CodeRef {
            entry: at as usize,
            _chunk: Arc::clone(chunk),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placed_code_runs_and_chunks_roll_over() {
        let mut mem = CodeMemory::default();
        // mov eax, 42; ret
        let code = [0xb8, 42, 0, 0, 0, 0xc3];
        let r = mem.place(&code).expect("an executable mapping");
        // SAFETY: the bytes placed are a complete function returning a u32 in EAX.
        let f: extern "sysv64" fn() -> u32 = unsafe { std::mem::transmute(r.entry()) };
        assert_eq!(f(), 42);
        let big = vec![0xc3u8; CHUNK_BYTES - 8];
        let second = mem.place(&big).expect("a second chunk");
        assert_ne!(
            second.entry(),
            r.entry() + 16,
            "a full chunk starts a new one"
        );
        assert_eq!(
            f(),
            42,
            "the first chunk lives while its code is referenced"
        );
    }
}
