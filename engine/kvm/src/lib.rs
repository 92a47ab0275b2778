//! The kvm engine (not implemented yet; see issue #2).
