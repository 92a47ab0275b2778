//! The guest corpus, assembled in Rust with iced-x86 (not implemented yet; see issue #2).
