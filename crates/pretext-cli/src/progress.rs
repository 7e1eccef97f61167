//! The CLI's [`Observer`]: an indicatif progress bar on a terminal, periodic
//! log lines otherwise.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pretext_core::trainer::{Observer, StepReport};
use std::io::IsTerminal;

/// Draws training progress. Hidden with `--quiet`; when stderr is not a
/// terminal (CI, `nohup`), prints one line every 50 steps instead.
pub struct ProgressObserver {
    bar: ProgressBar,
    interactive: bool,
    quiet: bool,
    log_every: u64,
    label: String,
}

impl ProgressObserver {
    /// A new observer for a task called `label` (e.g. `simclr`).
    pub fn new(label: &str, quiet: bool) -> Self {
        let interactive = !quiet && std::io::stderr().is_terminal();
        let bar = ProgressBar::with_draw_target(
            Some(0),
            if interactive {
                ProgressDrawTarget::stderr()
            } else {
                ProgressDrawTarget::hidden()
            },
        );
        let style =
            ProgressStyle::with_template("{prefix:>10} [{elapsed_precise}] {wide_bar} {pos}/{len} ({eta} left) {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_prefix(label.to_string());
        Self {
            bar,
            interactive,
            quiet,
            log_every: 50,
            label: label.to_string(),
        }
    }
}

/// One line of status: `loss 0.4321  lr 1.00e-3  acc 0.91`.
pub fn format_status(r: &StepReport) -> String {
    let mut s = format!("loss {:.4}  lr {:.2e}", r.loss, r.lr);
    for (k, v) in &r.stats {
        s.push_str(&format!("  {k} {v:.4}"));
    }
    s
}

impl Observer for ProgressObserver {
    fn on_start(&mut self, start: u64, total: u64) {
        self.bar.reset();
        self.bar.set_length(total);
        self.bar.set_position(start);
        self.bar.reset_eta();
    }

    fn on_step(&mut self, r: &StepReport) {
        let status = format_status(r);
        if self.interactive {
            self.bar.set_position(r.step);
            self.bar.set_message(status);
        } else if !self.quiet && (r.step.is_multiple_of(self.log_every) || r.step == r.total_steps) {
            eprintln!(
                "{} step {}/{} epoch {}  {status}",
                self.label, r.step, r.total_steps, r.epoch
            );
        }
    }

    fn on_message(&mut self, message: &str) {
        if self.interactive {
            self.bar.println(message);
        } else if !self.quiet {
            eprintln!("{message}");
        }
    }

    fn on_finish(&mut self, _steps: u64) {
        self.bar.finish_and_clear();
    }

    fn on_progress(&mut self, task: &str, done: u64, total: u64) {
        if self.interactive {
            if done == 0 {
                self.bar.reset();
                self.bar.set_length(total);
            }
            self.bar.set_position(done);
            self.bar.set_message(task.to_string());
            if done >= total {
                self.bar.finish_and_clear();
            }
        } else if !self.quiet && done >= total {
            eprintln!("{} {task}: done ({total})", self.label);
        }
    }
}
