//! A trace names its images by path, and a trace can come from anyone: the replayer reads
//! only a regular file of exactly the recorded size, and says nothing about a file that is
//! not the recorded image beyond that it is not.

use deja_machine::loader::ImageFormat;
use deja_replayer::resolve_image;
use deja_traces::ImageRecord;

fn record_naming(path: &str, bytes: &[u8]) -> ImageRecord {
    let spec = serde_json::to_vec(&ImageFormat::Multiboot).unwrap();
    ImageRecord::new(path, bytes, "multiboot", spec)
}

fn no_guests(_: &str) -> Option<deja_machine::loader::Image> {
    None
}

#[test]
fn image_paths_in_a_trace_reach_only_regular_files_of_the_recorded_size() {
    let dir = std::env::temp_dir().join(format!("deja-image-paths-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("fifo");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let other = dir.join("other");
    std::fs::write(&other, b"not the image, same size").unwrap();
    let image = b"the image that was recorded";
    let wrong_size = b"the image!";

    // A device and a FIFO of the recorded size 0 would be read forever or block.
    for path in ["/dev/zero", fifo.to_str().unwrap()] {
        let err = resolve_image(&record_naming(path, b""), &no_guests).unwrap_err();
        assert!(
            err.to_string().contains("not a regular file"),
            "{path}: {err}"
        );
    }
    // Another file: its size is compared first and it is not read.
    let err = resolve_image(
        &record_naming(other.to_str().unwrap(), wrong_size),
        &no_guests,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("has 10 bytes, the file 24"), "{err}");
    // Of the same size but other bytes: its digest is not printed.
    let same_size = &image[..24];
    let err = resolve_image(
        &record_naming(other.to_str().unwrap(), same_size),
        &no_guests,
    )
    .unwrap_err()
    .to_string();
    let found = deja_traces::Digest::of(b"not the image, same size").to_string();
    assert!(err.contains("not its BLAKE3 digest"), "{err}");
    assert!(!err.contains(&found), "{err}");
    // The real image is found.
    let real = dir.join("real");
    std::fs::write(&real, image).unwrap();
    let got = resolve_image(&record_naming(real.to_str().unwrap(), image), &no_guests).unwrap();
    assert_eq!(got.bytes, image);
    std::fs::remove_dir_all(&dir).unwrap();
}
