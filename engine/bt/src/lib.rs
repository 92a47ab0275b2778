//! The bt engine: a binary translator for x86 (not implemented yet; see issue #3).
