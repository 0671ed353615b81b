//! Showing long work while it runs: a batch that `submit --wait` follows,
//! and the phases of the bench and the fault-injection harness.
//!
//! On a terminal (standard error is one) a bar or a spinner is drawn on
//! standard error; otherwise plain lines are printed, a few at most every few
//! seconds; with `--json`, one JSON object a line on standard output. What
//! the command prints as its result (the decision, the summary) stays on
//! standard output in every case.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use holdfast_common::messages::{BatchFigures, Event, Granted};
use holdfast_common::pricing::thousands;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::report;

/// At most one plain progress line this often.
const LINE_EVERY: Duration = Duration::from_secs(2);
/// With no news for this long, a plain line says the batch still runs.
const QUIET_LINE_AFTER: Duration = Duration::from_secs(10);
/// How often a bar or spinner redraws (its clock and spinner move).
const TICK: Duration = Duration::from_millis(120);

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// A bar on standard error, which is a terminal.
    Bar,
    /// Plain lines on standard output.
    Lines,
    /// JSON lines on standard output: every event as it comes.
    Json,
}

impl Style {
    /// JSON lines with `--json`, a bar when standard error is a terminal,
    /// plain lines otherwise.
    pub fn detect(json: bool) -> Self {
        if json {
            Style::Json
        } else if std::io::stderr().is_terminal() {
            Style::Bar
        } else {
            Style::Lines
        }
    }
}

/// Items settled so far: done or failed (or never started, cancelled).
fn settled(f: &BatchFigures) -> u64 {
    u64::try_from(f.succeeded + f.failed + f.cancelled).unwrap_or(0)
}

/// Items per second since `started`, and the time left at that rate.
fn pace(done: u64, total: u64, started: Instant) -> (f64, Option<Duration>) {
    let secs = started.elapsed().as_secs_f64();
    if done == 0 || secs <= 0.0 {
        return (0.0, None);
    }
    let rate = done as f64 / secs;
    let left = total.saturating_sub(done) as f64 / rate;
    (rate, Some(Duration::from_secs_f64(left.min(1e9))))
}

/// `4s`, `2m 05s`, `1h 02m`.
fn short(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// One granted batch, followed to its end: fed its progress events, then
/// its `completed` summary.
pub struct BatchProgress {
    style: Style,
    batch_id: String,
    total: u64,
    started: Instant,
    bar: Option<ProgressBar>,
    last: Option<BatchFigures>,
    /// When the last plain line was printed.
    last_line: Instant,
    /// Whether a progress line was printed yet (the first one is at once).
    shown: bool,
}

impl BatchProgress {
    /// Start following `granted`. `hidden` says why progress events cannot
    /// be seen, if they cannot: then only the summary will come.
    pub fn start(style: Style, granted: &Granted, hidden: Option<&str>) -> Self {
        let total = granted.item_ids.len() as u64;
        let bar = (style == Style::Bar).then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} {elapsed:>4} [{bar:30}] {pos}/{len} items {msg}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar.set_message(match hidden {
                Some(_) => "· progress not visible to this broker user: waiting for the summary"
                    .to_string(),
                None => "· waiting for the first progress event".to_string(),
            });
            bar.enable_steady_tick(TICK);
            bar
        });
        if style == Style::Lines {
            println!(
                "batch {}: running {} item(s); the summary follows when it closes",
                granted.batch_id, total
            );
            if let Some(why) = hidden {
                println!("batch {}: no progress events ({why})", granted.batch_id);
            }
        }
        Self {
            style,
            batch_id: granted.batch_id.clone(),
            total,
            started: Instant::now(),
            bar,
            last: None,
            last_line: Instant::now(),
            shown: false,
        }
    }

    /// A `progress` event of the batch.
    pub fn update(&mut self, event: &Event) {
        let Event::Progress { figures: f, .. } = event else {
            return;
        };
        if self.last.as_ref() == Some(f) {
            return;
        }
        // A sequential batch reserves chunk after chunk: what runs may grow.
        self.total = self.total.max(u64::try_from(f.run).unwrap_or(0));
        let done = settled(f);
        let (rate, left) = pace(done, self.total, self.started);
        match self.style {
            Style::Json => report::json_line(event),
            Style::Bar => {
                if let Some(bar) = &self.bar {
                    bar.set_length(self.total);
                    bar.set_position(done);
                    bar.set_message(format!(
                        "· {} failed · {} credits captured · {rate:.1}/s · ETA {}",
                        f.failed,
                        thousands(f.captured),
                        left.map_or("?".into(), short)
                    ));
                }
            }
            Style::Lines => {
                if !self.shown || self.last_line.elapsed() >= LINE_EVERY || done >= self.total {
                    println!(
                        "batch {}: {done} of {} items done ({} failed), {} credits captured, {rate:.1} items/s, ETA {}",
                        self.batch_id,
                        self.total,
                        f.failed,
                        thousands(f.captured),
                        left.map_or("?".into(), short)
                    );
                    self.last_line = Instant::now();
                    self.shown = true;
                }
            }
        }
        self.last = Some(f.clone());
    }

    /// Time passes with no event: a plain line now and then says the batch
    /// still runs (the bar's own clock moves by itself).
    pub fn tick(&mut self) {
        if self.style == Style::Lines && self.last_line.elapsed() >= QUIET_LINE_AFTER {
            let done = self.last.as_ref().map_or(0, settled);
            println!(
                "batch {}: still running after {}, {done} of {} items done",
                self.batch_id,
                short(self.started.elapsed()),
                self.total
            );
            self.last_line = Instant::now();
        }
    }

    /// The batch closed: finish the bar and print the summary.
    pub fn finish(self, completed: &Event) {
        if let (Some(bar), Event::Completed { figures: f, .. }) = (&self.bar, completed) {
            bar.set_length(self.total.max(settled(f)));
            bar.set_position(settled(f));
            bar.set_message(format!(
                "· {} failed · {} credits captured",
                f.failed,
                thousands(f.captured)
            ));
            bar.finish();
        }
        match self.style {
            Style::Json => report::json_line(completed),
            Style::Bar | Style::Lines => report::completed(completed),
        }
    }

    /// Give up (an error ends the wait): leave the bar as it is.
    pub fn abandon(self) {
        if let Some(bar) = &self.bar {
            bar.abandon();
        }
    }
}

/// The phase now running, if any: one at a time per process.
static PHASE: Mutex<Option<Phase>> = Mutex::new(None);

struct Phase {
    tool: &'static str,
    what: String,
    started: Instant,
    spinner: Option<ProgressBar>,
}

impl Phase {
    fn end(self, outcome: Option<&str>) {
        let took = short(self.started.elapsed());
        let outcome = outcome.map(|o| format!(": {o}")).unwrap_or_default();
        match self.spinner {
            Some(s) => s.finish_with_message(format!("{}{outcome} ({took})", self.what)),
            None if !outcome.is_empty() => {
                eprintln!("{}: {}{outcome} ({took})", self.tool, self.what)
            }
            None => {}
        }
    }
}

/// A new phase of `tool`'s work (the bench's measurements, the harness's
/// scenarios) begins; the one before it, if any, ends. On a terminal a
/// spinner with the phase and its elapsed time, left as a line when it
/// ends; otherwise a line `tool: what` on standard error.
pub fn phase(tool: &'static str, what: impl Into<String>) {
    let what = what.into();
    let spinner = std::io::stderr().is_terminal().then(|| {
        let s = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        s.set_style(
            ProgressStyle::with_template(&format!("{{spinner}} {tool}: {{msg}} {{elapsed}}"))
                .expect("a valid template"),
        );
        s.set_message(what.clone());
        s.enable_steady_tick(TICK);
        s
    });
    if spinner.is_none() {
        eprintln!("{tool}: {what}");
    }
    let new = Phase {
        tool,
        what,
        started: Instant::now(),
        spinner,
    };
    let old = PHASE.lock().map(|mut p| p.replace(new)).ok().flatten();
    if let Some(old) = old {
        old.end(None);
    }
}

/// The running phase ends, with `outcome` (`ok`, `FAILED`, …) if given: a
/// line `tool: what: outcome (time)`.
pub fn phase_done(outcome: Option<&str>) {
    if let Some(p) = PHASE.lock().ok().and_then(|mut p| p.take()) {
        p.end(outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_short() {
        assert_eq!(short(Duration::from_secs(4)), "4s");
        assert_eq!(short(Duration::from_secs(125)), "2m 05s");
        assert_eq!(short(Duration::from_secs(3720)), "1h 02m");
    }

    #[test]
    fn pace_is_unknown_before_the_first_item() {
        let started = Instant::now() - Duration::from_secs(10);
        assert_eq!(pace(0, 10, started), (0.0, None));
        let (rate, left) = pace(5, 10, started);
        assert!((rate - 0.5).abs() < 0.01, "{rate}");
        let left = left.unwrap().as_secs_f64();
        assert!((9.0..=11.0).contains(&left), "{left}");
    }
}
