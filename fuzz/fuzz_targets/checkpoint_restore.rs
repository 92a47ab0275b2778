//! Checkpoint decode and restore into a fresh 16 MiB deja-pc machine with a bt engine, as
//! `deja replay --seek` does. A trace (`DEJATRAC`, `DEJAPLAN`) has each of its checkpoints
//! restored; anything else is a [`deja_fuzz::CheckpointInput`].
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.starts_with(&deja_traces::FILE_MAGIC) || data.starts_with(&deja_fuzz::PLAIN_MAGIC) {
        for trace in deja_fuzz::traces_of(data) {
            deja_fuzz::restore_checkpoints(&trace);
        }
    } else if let Some(input) = deja_fuzz::CheckpointInput::parse(data) {
        let memory = input.memory();
        deja_fuzz::restore(
            &memory,
            &input.cpu_state,
            &input.machine_state,
            u32::from(input.format),
        );
    }
});
