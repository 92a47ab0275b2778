//! The trace reader over arbitrary bytes: open, every event, every checkpoint and its
//! memory, verify, stats, dump. Real traces are also read with their checksums fixed, and
//! plain traces (`DEJAPLAN`) are compressed first, so mutations get past the checksums and
//! zstd (see the crate docs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for trace in deja_fuzz::traces_of(data) {
        deja_fuzz::exercise_trace(&trace);
    }
});
