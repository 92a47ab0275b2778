//! The bench harness (not implemented yet; see issue #5).
