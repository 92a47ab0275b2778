//! The image sidecar parser: the bytes up to the first NUL are written as `IMAGE.json`, the
//! rest as `IMAGE` (no NUL: no sidecar, so the image is detected), and
//! `Image::from_file` reads them as `deja run IMAGE` does; a description it accepts is
//! loaded into a 16 MiB machine. Checks that the sidecar reads as `serde_json` reads it and
//! that `write_with_sidecar` reads back the same image.
#![no_main]

use deja_machine::loader::{Image, ImageFormat, sidecar_path};
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

/// One directory per process; each input overwrites the same two files.
fn paths() -> &'static (tempfile::TempDir, PathBuf, PathBuf) {
    static PATHS: OnceLock<(tempfile::TempDir, PathBuf, PathBuf)> = OnceLock::new();
    PATHS.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let image = dir.path().join("image.bin");
        let copy = dir.path().join("copy.bin");
        (dir, image, copy)
    })
}

fuzz_target!(|data: &[u8]| {
    let (_, path, copy) = paths();
    let sidecar = sidecar_path(path);
    let (json, bytes) = match data.iter().position(|&b| b == 0) {
        Some(nul) => (Some(&data[..nul]), &data[nul + 1..]),
        None => (None, data),
    };
    std::fs::write(path, bytes).expect("writing the image");
    match json {
        Some(json) => std::fs::write(&sidecar, json).expect("writing the sidecar"),
        None => {
            let _ = std::fs::remove_file(&sidecar);
        }
    }
    let Ok(image) = Image::from_file(path) else {
        return;
    };
    if let Some(json) = json {
        let parsed: ImageFormat = serde_json::from_slice(json).expect("from_file accepted it");
        assert_eq!(
            parsed, image.format,
            "from_file reads the sidecar as serde_json does"
        );
    }
    image.write_with_sidecar(copy).expect("writing a copy");
    let again = Image::from_file(copy).expect("reading the copy");
    assert_eq!(again.bytes, image.bytes, "the copy has the same bytes");
    assert_eq!(again.format, image.format, "the copy has the same format");
    let config = deja_machine::MachineConfig {
        ram_size: deja_fuzz::FUZZ_RAM,
        ..Default::default()
    };
    deja_fuzz::load_image(config, &image);
});
