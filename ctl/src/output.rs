//! Tables and progress for people.

use std::io::{IsTerminal as _, Write};
use std::time::{Duration, Instant};

/// A plain text table with aligned columns.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Renders the table; the last column is not padded.
    pub fn render(&self) -> String {
        let columns = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate().take(columns) {
                if i + 1 == columns {
                    line.push_str(cell);
                } else {
                    line.push_str(&format!("{cell:<width$}  ", width = widths[i]));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// How often a command that waits redraws its progress on a terminal.
pub const PROGRESS_TICK: Duration = Duration::from_millis(200);

/// The progress of a command that waits, on stderr. On a terminal, one line redrawn in place
/// (what it waits for, the state so far, the time spent), with events printed above it; when
/// stderr is not a terminal, each event is a plain line and the redrawn state is left out.
#[derive(Debug)]
pub struct Progress<W: Write = std::io::Stderr> {
    out: W,
    tty: bool,
    label: String,
    state: String,
    started: Instant,
    drawn: bool,
}

impl Progress {
    /// Progress of waiting for `label` (`waiting for 3 instances`), on stderr.
    pub fn new(label: impl Into<String>) -> Self {
        let tty = std::io::stderr().is_terminal();
        Progress::to(std::io::stderr(), tty, label)
    }
}

impl<W: Write> Progress<W> {
    /// Progress written to `out`, redrawn in place when `tty`.
    pub fn to(out: W, tty: bool, label: impl Into<String>) -> Self {
        Self {
            out,
            tty,
            label: label.into(),
            state: String::new(),
            started: Instant::now(),
            drawn: false,
        }
    }

    /// The state so far, in a few words (`1 of 3 started`); redrawn on a terminal.
    pub fn state(&mut self, state: impl Into<String>) {
        self.state = state.into();
        self.redraw();
    }

    /// Redraws the line with the time spent (call every [`PROGRESS_TICK`] while waiting).
    pub fn redraw(&mut self) {
        if !self.tty {
            return;
        }
        let secs = self.started.elapsed().as_secs_f64();
        let sep = if self.state.is_empty() { "" } else { ": " };
        let _ = write!(
            self.out,
            "\r\x1b[2K{}{sep}{} ({secs:.1}s)",
            self.label, self.state
        );
        let _ = self.out.flush();
        self.drawn = true;
    }

    /// Something that happened, as a line of its own (above the progress line on a terminal).
    pub fn event(&mut self, line: &str) {
        self.clear();
        let _ = writeln!(self.out, "{line}");
        self.redraw();
    }

    /// Removes the progress line; what was printed as events stays.
    pub fn finish(&mut self) {
        self.clear();
        let _ = self.out.flush();
    }

    fn clear(&mut self) {
        if self.drawn {
            let _ = write!(self.out, "\r\x1b[2K");
            self.drawn = false;
        }
    }

    /// The writer (for tests).
    #[cfg(test)]
    fn into_inner(self) -> W {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_plain_lines_off_a_terminal() {
        let mut p = Progress::to(Vec::new(), false, "waiting for 2 instances");
        p.state("0 of 2");
        p.event("01A started on h1");
        p.redraw();
        p.event("01B failed on h2: no such file");
        p.finish();
        let text = String::from_utf8(p.into_inner()).unwrap();
        assert_eq!(text, "01A started on h1\n01B failed on h2: no such file\n");
    }

    #[test]
    fn progress_is_redrawn_in_place_on_a_terminal() {
        let mut p = Progress::to(Vec::new(), true, "uploading app.wasm");
        p.state("1.0 of 4.0 MiB");
        p.event("stored");
        p.finish();
        let text = String::from_utf8(p.into_inner()).unwrap();
        assert!(
            text.starts_with("\r\x1b[2Kuploading app.wasm: 1.0 of 4.0 MiB (0.0s)\r\x1b[2Kstored\n"),
            "{text:?}"
        );
        assert!(
            text.ends_with("\r\x1b[2K"),
            "the line is cleared at the end: {text:?}"
        );
    }

    #[test]
    fn aligns_columns() {
        let mut t = Table::new(&["ID", "STATUS"]);
        t.row(vec!["a-long-id".into(), "up".into()]);
        t.row(vec!["b".into(), "lost".into()]);
        assert_eq!(
            t.render(),
            "ID         STATUS\na-long-id  up\nb          lost\n"
        );
    }
}
