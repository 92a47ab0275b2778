//! Progress bars for long record/replay/verify work: on stderr, and only when stderr is a
//! terminal and the user did not ask for quiet or machine-readable output (so scripts and
//! tests never see them).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::Duration;

/// A bar towards `total` units (`None`: a spinner with a running count), hidden unless
/// `visible` and stderr is a terminal.
pub fn bar(total: Option<u64>, unit: &str, visible: bool) -> ProgressBar {
    let shown = visible && std::io::stderr().is_terminal();
    let pb = match total {
        Some(t) if t > 0 => ProgressBar::with_draw_target(Some(t), hidden_unless(shown)),
        _ => ProgressBar::with_draw_target(None, hidden_unless(shown)),
    };
    let template = if pb.length().is_some() {
        format!(
            "{{spinner}} {{msg}} [{{bar:30}}] {{human_pos}}/{{human_len}} {unit} \
             ({{percent}}%, {{elapsed}}, eta {{eta}})"
        )
    } else {
        format!("{{spinner}} {{msg}} {{human_pos}} {unit} ({{elapsed}})")
    };
    if let Ok(style) = ProgressStyle::with_template(&template) {
        pb.set_style(style.progress_chars("=> "));
    }
    if shown {
        pb.enable_steady_tick(Duration::from_millis(200));
    }
    pb
}

fn hidden_unless(shown: bool) -> ProgressDrawTarget {
    if shown {
        ProgressDrawTarget::stderr_with_hz(5)
    } else {
        ProgressDrawTarget::hidden()
    }
}

/// Whether the guest's serial output (`None` or `-`: stdout) lands on a terminal, where a
/// progress bar redrawn on stderr would tear it.
pub fn guest_output_on_terminal(serial_out: Option<&std::path::Path>) -> bool {
    match serial_out {
        Some(p) if p.as_os_str() != "-" => false,
        _ => std::io::stdout().is_terminal(),
    }
}
