//! Plots and reports from bench results (not implemented yet; see issue #5).
