//! The three panes: devices, holders of the selected device, event log.

use ratatui::{
    buffer::Buffer,
    layout::{Constraint, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{
        Block, Cell, HighlightSpacing, Paragraph, Row, StatefulWidget, Table, TableState, Widget,
    },
};

use super::text::{ago, page_size, rate, sparkline, stamp, tail};
use crate::ui::{
    devices::human,
    tui::{
        app::{App, Pane},
        model::DevState,
        record::LogKind,
    },
};

fn block(app: &App, pane: Pane, title: String) -> Block<'static> {
    let focused = app.focus == pane;
    let style = if focused {
        Style::new().fg(Color::Cyan).add_modifier(Modifier::BOLD)
    } else {
        Style::new().fg(Color::DarkGray)
    };
    Block::bordered()
        .border_style(style)
        .title(Span::styled(title, style))
}

fn selected_style(app: &App, pane: Pane) -> Style {
    if app.focus == pane {
        Style::new().add_modifier(Modifier::REVERSED)
    } else {
        Style::new().add_modifier(Modifier::BOLD)
    }
}

fn state_style(s: DevState) -> Style {
    match s {
        DevState::Online => Style::new().fg(Color::Green),
        DevState::Offline => Style::new().fg(Color::DarkGray),
        DevState::Fenced => Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD),
        DevState::Departing => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        DevState::Gone => Style::new().fg(Color::Red),
        DevState::Rebound => Style::new().fg(Color::Magenta).add_modifier(Modifier::BOLD),
    }
}

const HEAD: Style = Style::new().add_modifier(Modifier::BOLD);

pub fn devices(app: &App, area: Rect, buf: &mut Buffer) {
    let b = block(app, Pane::Devices, " Devices ".into());
    let inner = b.inner(area);
    b.render(area, buf);
    if app.snap.devices.is_empty() {
        Paragraph::new("no pmem namespaces seen yet (waiting for the agent's topology)")
            .render(inner, buf);
        return;
    }
    // Fixed columns; the mount point and the sparkline share what is left.
    let fixed = 2 + 9 + 7 + 10 + 10 + 5 + 7 + 1;
    let spare = inner.width.saturating_sub(fixed) as usize;
    let spark_w = (spare / 2).clamp(4, 60);
    let mount_w = spare.saturating_sub(spark_w).max(5);
    let rows = app.snap.devices.iter().map(|d| {
        Row::new(vec![
            Cell::from(d.name.clone()),
            Cell::from(d.mode.to_string()),
            Cell::from(d.size.map(human).unwrap_or_else(|| "-".into())),
            Cell::from(tail(d.mount.as_deref().unwrap_or("-"), mount_w)),
            Cell::from(Span::styled(d.state.label(), state_style(d.state))),
            Cell::from(format!("{:>4}", d.holders)),
            Cell::from(format!("{:>6}", rate(d.faults_per_sec))),
            Cell::from(Span::styled(
                sparkline(&d.history, spark_w),
                Style::new().fg(Color::Cyan),
            )),
        ])
    });
    let header = Row::new(vec![
        "DEVICE".to_string(),
        "MODE".into(),
        "SIZE".into(),
        "MOUNT".into(),
        "STATE".into(),
        "HOLD".into(),
        " FLT/S".into(),
        if spark_w >= 18 {
            format!("FAULTS/S, LAST {spark_w}s")
        } else {
            format!("LAST {spark_w}s")
        },
    ])
    .style(HEAD);
    let table = Table::new(
        rows,
        [
            Constraint::Length(8),
            Constraint::Length(6),
            Constraint::Length(9),
            Constraint::Length(mount_w as u16),
            Constraint::Length(9),
            Constraint::Length(4),
            Constraint::Length(6),
            Constraint::Length(spark_w as u16),
        ],
    )
    .header(header)
    .row_highlight_style(selected_style(app, Pane::Devices))
    .highlight_symbol("▸ ")
    .highlight_spacing(HighlightSpacing::Always);
    let mut st = TableState::default().with_selected(app.device_index());
    StatefulWidget::render(table, inner, buf, &mut st);
}

pub fn holders(app: &App, area: Rect, buf: &mut Buffer) {
    let hs = app.holders();
    let dev = app.device_index().map(|i| &app.snap.devices[i]);
    let title = match dev {
        Some(d) => format!(
            " Holders of {} ({} process{}, {} pages, by {}){} ",
            d.name,
            d.holders,
            if d.holders == 1 { "" } else { "es" },
            d.pages,
            app.sort.label(),
            if app.filter.is_empty() {
                String::new()
            } else {
                format!(" matching \"{}\": {}", app.filter, hs.len())
            }
        ),
        None => " Holders ".into(),
    };
    let b = block(app, Pane::Holders, title);
    let inner = b.inner(area);
    b.render(area, buf);
    if hs.is_empty() {
        let msg = match dev {
            None => "select a device".to_string(),
            Some(d) if !app.filter.is_empty() => {
                format!("no holder of {} matches \"{}\"", d.name, app.filter)
            }
            Some(d) => format!("nobody maps {} right now", d.name),
        };
        Paragraph::new(msg)
            .style(Style::new().fg(Color::DarkGray))
            .render(inner, buf);
        return;
    }
    let fixed = 2 + 7 + 15 + 8 + 5 + 9 + 6;
    let file_w = inner.width.saturating_sub(fixed).max(8) as usize;
    let now = app.snap.now_ns;
    let rows = hs.iter().map(|h| {
        Row::new(vec![
            Cell::from(format!("{:>7}", h.pid)),
            Cell::from(h.comm.clone()),
            Cell::from(tail(h.file.as_deref().unwrap_or("?"), file_w)),
            Cell::from(format!("{:>8}", h.pages)),
            Cell::from(format!("{:>5}", page_size(h.page_size))),
            Cell::from(format!("{:>9}", ago(now, h.last_fault_ns))),
        ])
    });
    let header = Row::new(vec![
        Cell::from("    PID"),
        Cell::from("COMM"),
        Cell::from("FILE"),
        Cell::from("   PAGES"),
        Cell::from("PSIZE"),
        Cell::from("LASTFAULT"),
    ])
    .style(HEAD);
    let table = Table::new(
        rows,
        [
            Constraint::Length(7),
            Constraint::Length(15),
            Constraint::Length(file_w as u16),
            Constraint::Length(8),
            Constraint::Length(5),
            Constraint::Length(9),
        ],
    )
    .header(header)
    .row_highlight_style(selected_style(app, Pane::Holders))
    .highlight_symbol("▸ ")
    .highlight_spacing(HighlightSpacing::Always);
    let mut st = TableState::default().with_selected(app.holder_index());
    StatefulWidget::render(table, inner, buf, &mut st);
}

fn kind_style(k: LogKind) -> Style {
    match k {
        LogKind::Departure | LogKind::Failure => {
            Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)
        }
        LogKind::Signal | LogKind::Denied => Style::new().fg(Color::Magenta),
        LogKind::Drop => Style::new().fg(Color::Yellow),
        LogKind::Drain => Style::new().fg(Color::Cyan),
        LogKind::Info => Style::new().fg(Color::DarkGray),
    }
}

pub fn log(app: &App, area: Rect, buf: &mut Buffer) {
    let entries = app.log();
    let title = if app.log_back > 0 {
        format!(" Events ({} back of {}) ", app.log_back, entries.len())
    } else {
        format!(" Events ({}) ", entries.len())
    };
    let b = block(app, Pane::Log, title);
    let inner = b.inner(area);
    b.render(area, buf);
    if entries.is_empty() {
        Paragraph::new("no failures, departures, signals or drops so far")
            .style(Style::new().fg(Color::DarkGray))
            .render(inner, buf);
        return;
    }
    let h = inner.height as usize;
    let end = entries.len().saturating_sub(app.log_back);
    let start = end.saturating_sub(h);
    let lines: Vec<Line> = entries[start..end]
        .iter()
        .map(|e| {
            Line::from(vec![
                Span::raw(stamp(e.ts_ns)),
                Span::raw(" "),
                Span::styled(format!("{:<6}", e.kind.label()), kind_style(e.kind)),
                Span::raw(" "),
                Span::raw(e.text.clone()),
            ])
        })
        .collect();
    Paragraph::new(lines).render(inner, buf);
}
