//! Turns real files into seed inputs (see README.md):
//!
//! ```text
//! seedgen trace TRACE OUT_DIR   plain form of TRACE (trace_reader, checkpoint_restore) and
//!                               one checkpoint input per checkpoint, keeping at most
//!                               MAX_SEED_PAGES pages (checkpoint_restore)
//! seedgen image IMAGE OUT_DIR   a loader input loading IMAGE as its sidecar says
//!                               (image_loaders)
//! ```
//! Builds without libFuzzer: `cargo run --no-default-features --bin seedgen -- ...`.

use deja_fuzz::{CheckpointInput, LoaderInput};
use deja_machine::loader::Image;
use deja_traces::TraceReader;
use std::path::Path;

/// Pages kept in a checkpoint seed: restore treats every page alike, and seeds stay small.
const MAX_SEED_PAGES: usize = 2;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [what, file, out] = &args[..] else {
        return Err("usage: seedgen trace|image FILE OUT_DIR".into());
    };
    let out = Path::new(out);
    std::fs::create_dir_all(out)?;
    let stem = Path::new(file)
        .file_name()
        .ok_or("no file name")?
        .to_string_lossy()
        .into_owned();
    match what.as_str() {
        "trace" => {
            let bytes = std::fs::read(file)?;
            let plain = deja_fuzz::to_plain(&bytes).ok_or("a payload does not decompress")?;
            std::fs::write(out.join(format!("{stem}.plain")), plain)?;
            let mut r = TraceReader::open(file)?;
            let format = r.format_version().min(u32::from(u8::MAX)) as u8;
            for cp in r.checkpoints().to_vec() {
                let checkpoint = r.read_checkpoint(&cp)?;
                let input = CheckpointInput {
                    format,
                    cpu_state: checkpoint.meta.cpu_state,
                    machine_state: checkpoint.meta.device_state,
                    pages: (checkpoint.pages.into_iter())
                        .take(MAX_SEED_PAGES)
                        .map(|(n, page)| (n, page.to_vec()))
                        .collect(),
                };
                let name = format!("{stem}.cp{}", cp.ordinal);
                std::fs::write(out.join(name), input.encode())?;
            }
        }
        "image" => {
            let image = Image::from_file(Path::new(file))?;
            let input = LoaderInput::from_image(&image).encode();
            std::fs::write(out.join(format!("{stem}.load")), input)?;
        }
        other => return Err(format!("unknown kind {other:?}: trace or image").into()),
    }
    Ok(())
}
