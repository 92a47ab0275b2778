//! Live run to trace: the recording `Host` (not implemented yet; see issue #4).
