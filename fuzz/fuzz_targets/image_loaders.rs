//! The image loaders (raw in each entry mode, multiboot ELF and a.out kludge, firmware ROMs,
//! detection) writing arbitrary bytes into a fresh deja-pc machine; see
//! [`deja_fuzz::LoaderInput`] for the input layout.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(input) = deja_fuzz::LoaderInput::parse(data) else {
        return;
    };
    if let Some(image) = input.image() {
        deja_fuzz::load_image(input.config(), &image);
    }
});
