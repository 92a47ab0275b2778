//! Trace to deterministic re-execution (not implemented yet; see issue #4).
