//! Drawing: `impl Widget for &App`. One function per pane; nothing here changes state, so a
//! frame is a pure function of the [`App`] (and tests compare it with reviewed text).

mod overlay;
mod panes;
pub mod text;

use ratatui::{
    buffer::Buffer,
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Paragraph, Widget, Wrap},
};

use super::{
    app::{App, Link, Overlay, Source},
    keys::FOOTER,
};

/// Below this the panes cannot show a useful row: say so instead.
pub const MIN_WIDTH: u16 = 60;
pub const MIN_HEIGHT: u16 = 16;

impl Widget for &App {
    fn render(self, area: Rect, buf: &mut Buffer) {
        if area.width < MIN_WIDTH || area.height < MIN_HEIGHT {
            too_small(area, buf);
            return;
        }
        let devices = (self.snap.devices.len().max(1) as u16 + 3).min(area.height / 3);
        let log = if area.height >= 30 { 10 } else { 6 };
        let [header, dev, holders, log_area, footer] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Length(devices),
            Constraint::Min(4),
            Constraint::Length(log),
            Constraint::Length(1),
        ])
        .areas(area);
        header_line(self, header, buf);
        panes::devices(self, dev, buf);
        panes::holders(self, holders, buf);
        panes::log(self, log_area, buf);
        footer_line(self, footer, buf);
        match &self.overlay {
            Overlay::None => {}
            Overlay::Help => overlay::help(self, area, buf),
            Overlay::Detail => overlay::detail(self, area, buf),
            Overlay::ConfirmDrain(plan) => overlay::confirm_drain(plan, area, buf),
        }
    }
}

fn too_small(area: Rect, buf: &mut Buffer) {
    let msg = format!(
        "dax-probe tui: the terminal is {}x{}; it needs at least {MIN_WIDTH}x{MIN_HEIGHT}. \
         Enlarge it, or press q to quit.",
        area.width, area.height
    );
    Paragraph::new(msg)
        .wrap(Wrap { trim: true })
        .render(area, buf);
}

fn header_line(app: &App, area: Rect, buf: &mut Buffer) {
    let s = &app.snap;
    let bold = Style::new().add_modifier(Modifier::BOLD);
    let warn = Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD);
    let mut spans = vec![Span::styled(" dax-probe ", bold.fg(Color::Cyan))];
    // Most important first: a narrow terminal cuts the end.
    if app.paused {
        spans.push(Span::styled("│ PAUSED ", warn));
    }
    let holders: usize = s.devices.iter().map(|d| d.holders).sum();
    let (mode, file) = match &app.source {
        Source::Live => {
            let mode = match &app.link {
                Link::Own => "live/own agent",
                Link::Attached(_) => "live/attached",
                Link::Gone(_) => "last map",
            };
            if let Link::Gone(_) = &app.link {
                // Said first and loud: the map below is the last one seen, not the machine's.
                spans.push(Span::styled("│ AGENT GONE: not live ", warn));
            }
            (mode.to_string(), s.kernel.clone().unwrap_or_default())
        }
        Source::Replay { file, speed, done } => (
            format!("replay x{speed}{}", if *done { " end" } else { "" }),
            file.rsplit('/').next().unwrap_or(file).to_string(),
        ),
    };
    spans.push(Span::raw(format!(
        "│ {mode} │ {} dev {holders} hold │ ",
        s.devices.len()
    )));
    let drops = format!("drops {}", s.stats.kernel_dropped);
    spans.push(if s.stats.kernel_dropped > 0 {
        Span::styled(drops, warn)
    } else {
        Span::raw(drops)
    });
    spans.push(Span::raw(" │ "));
    let lag = format!("ui lag {}", s.stats.ui_lag);
    spans.push(if s.stats.ui_lag > 0 {
        Span::styled(lag, warn)
    } else {
        Span::raw(lag)
    });
    if s.stats.malformed > 0 {
        spans.push(Span::raw(" │ "));
        spans.push(Span::styled(
            format!(
                "{} bad line{}",
                s.stats.malformed,
                if s.stats.malformed == 1 { "" } else { "s" }
            ),
            warn,
        ));
    }
    if !file.is_empty() {
        spans.push(Span::raw(format!(" │ {file}")));
    }
    Line::from(spans).render(area, buf);
}

fn footer_line(app: &App, area: Rect, buf: &mut Buffer) {
    let key = Style::new().add_modifier(Modifier::REVERSED);
    let line = if let Some(f) = &app.filter_edit {
        Line::from(vec![
            Span::styled(" / ", key),
            Span::raw(format!(" filter: {f}▏ (Enter apply, Esc cancel)")),
        ])
    } else if let Some(m) = &app.message {
        Line::from(Span::styled(
            format!(" {m}"),
            Style::new().fg(Color::Yellow),
        ))
    } else {
        let mut spans = Vec::new();
        for (k, what) in FOOTER {
            spans.push(Span::styled(k.to_string(), key));
            spans.push(Span::raw(format!(" {what} ")));
        }
        Line::from(spans)
    };
    line.render(area, buf);
}

/// The frame as text, one line per row, trailing blanks trimmed (for tests and
/// `--print-frame`).
pub fn to_text(buf: &Buffer) -> String {
    let area = buf.area;
    let mut out = String::new();
    for y in area.top()..area.bottom() {
        let mut line = String::new();
        let mut skip = 0;
        for x in area.left()..area.right() {
            if skip > 0 {
                skip -= 1;
                continue;
            }
            let sym = buf[(x, y)].symbol();
            // A wide character occupies the next cell too.
            skip = unicode_width::UnicodeWidthStr::width(sym).saturating_sub(1);
            line.push_str(sym);
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Renders the app into a `width`×`height` buffer.
pub fn frame(app: &App, width: u16, height: u16) -> Buffer {
    let area = Rect::new(0, 0, width, height);
    let mut buf = Buffer::empty(area);
    app.render(area, &mut buf);
    buf
}
