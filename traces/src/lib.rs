//! The deja trace format (not implemented yet; see issue #4).
