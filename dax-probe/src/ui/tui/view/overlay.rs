//! Popups drawn over the panes: help, one holder's detail, the drain confirmation.

use ratatui::{
    buffer::Buffer,
    layout::Rect,
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Clear, Paragraph, Widget, Wrap},
};

use super::text::{ago, page_size};
use crate::ui::tui::{
    app::{App, DrainPlan, Source},
    keys::HELP,
};

/// A centered rectangle `pct_w`% × `pct_h`% of `area`.
fn centered(area: Rect, pct_w: u16, pct_h: u16) -> Rect {
    let w = (area.width * pct_w / 100).max(20).min(area.width);
    let h = (area.height * pct_h / 100).max(5).min(area.height);
    Rect::new(
        area.x + (area.width - w) / 2,
        area.y + (area.height - h) / 2,
        w,
        h,
    )
}

fn popup(area: Rect, title: &str, lines: Vec<Line>, scroll: u16, buf: &mut Buffer) {
    Clear.render(area, buf);
    Paragraph::new(lines)
        .block(
            Block::bordered()
                .title(Span::styled(
                    title.to_string(),
                    Style::new().add_modifier(Modifier::BOLD),
                ))
                .border_style(Style::new().fg(Color::Cyan)),
        )
        .wrap(Wrap { trim: false })
        .scroll((scroll, 0))
        .render(area, buf);
}

pub fn help(app: &App, area: Rect, buf: &mut Buffer) {
    let key = Style::new().add_modifier(Modifier::BOLD);
    let mut lines: Vec<Line> = HELP
        .iter()
        .map(|(k, what)| {
            Line::from(vec![
                Span::styled(format!("{k:<12}"), key),
                Span::raw(*what),
            ])
        })
        .collect();
    lines.push(Line::raw(""));
    lines.push(Line::raw(match &app.source {
        Source::Live => {
            "Live: the agent runs in this process; `monitor --json > FILE` records a session \
             for `tui --replay FILE`."
        }
        Source::Replay { .. } => {
            "Replay: holders are rebuilt from the recorded events; --speed N plays N times \
             faster. Drain is off."
        }
    }));
    lines.push(Line::raw("Esc or ? closes this help."));
    popup(centered(area, 90, 80), " Keys ", lines, 0, buf);
}

pub fn detail(app: &App, area: Rect, buf: &mut Buffer) {
    let Some(h) = app.selected_holder() else {
        return;
    };
    let dev = app
        .device_index()
        .map(|i| app.snap.devices[i].name.clone())
        .unwrap_or_default();
    let key = Style::new().add_modifier(Modifier::BOLD);
    let kv =
        |k: &str, v: String| Line::from(vec![Span::styled(format!("{k:<11}"), key), Span::raw(v)]);
    let mut lines = vec![
        kv(
            "process",
            if h.start_time > 0 {
                format!(
                    "{} {} (started {} ticks after boot)",
                    h.pid, h.comm, h.start_time
                )
            } else {
                format!("{} {}", h.pid, h.comm)
            },
        ),
        kv("file", h.file.clone().unwrap_or_else(|| "?".into())),
        kv("inode", format!("{} on {}", h.ino, h.dev)),
        kv(
            "holds",
            format!(
                "{} pages of {dev} ({} pages), last fault {}",
                h.pages,
                page_size(h.page_size),
                ago(app.snap.now_ns, h.last_fault_ns)
            ),
        ),
        kv(
            "offsets",
            h.offsets
                .iter()
                .map(|(s, e)| format!("{s:#x}-{e:#x}"))
                .collect::<Vec<_>>()
                .join(", "),
        ),
        Line::raw(""),
        Line::styled(
            format!(
                "{:<18} {:<12} {:<12} {:>7}   ({} range{})",
                "VADDR",
                "PFN",
                "OFFSET",
                "PAGES",
                h.extents.len(),
                if h.extents.len() == 1 { "" } else { "s" }
            ),
            key,
        ),
    ];
    // Only when known: a recording replayed has no /proc to read cgroups from.
    if let Some(w) = &h.workload {
        lines.insert(1, kv("workload", w.clone()));
    }
    for e in &h.extents {
        lines.push(Line::raw(format!(
            "{:<18} {:<12} {:<12} {:>7}",
            format!("{:#x}", e.vaddr),
            format!("{:#x}", e.pfn),
            format!("{:#x}", e.offset),
            e.pages
        )));
    }
    popup(
        centered(area, 90, 80),
        &format!(" Holder {} {} — ↑↓ scroll, Esc close ", h.pid, h.comm),
        lines,
        app.detail_scroll as u16,
        buf,
    );
}

pub fn confirm_drain(plan: &DrainPlan, area: Rect, buf: &mut Buffer) {
    let warn = Style::new().fg(Color::Red).add_modifier(Modifier::BOLD);
    let mut steps = format!(
        "fence {} (no new mappings), send {} to its holders, wait {}",
        plan.device, plan.signal, plan.grace
    );
    match &plan.then {
        Some(t) => steps.push_str(&format!(", then {t}")),
        None => steps.push_str(", no escalation"),
    }
    match &plan.mount {
        Some(m) => steps.push_str(&format!("; then unmount {m} and unbind {}.", plan.device)),
        None => steps.push('.'),
    }
    let mut lines = vec![Line::raw(steps), Line::raw("")];
    let mut pids: Vec<u32> = plan.holders.iter().map(|h| h.pid).collect();
    pids.sort_unstable();
    pids.dedup();
    if pids.is_empty() {
        lines.push(Line::raw(
            "Nobody maps it right now: no process will be signalled.",
        ));
    } else {
        lines.push(Line::styled(
            format!("These {} process(es) will be signalled:", pids.len()),
            warn,
        ));
        for h in &plan.holders {
            let skip = plan.excluded.contains(&h.pid);
            lines.push(Line::raw(format!(
                "  {:>7} {:<15} {} ({} pages){}",
                h.pid,
                h.comm,
                h.file.as_deref().unwrap_or("?"),
                h.pages,
                if skip {
                    "  [excluded by policy: not signalled]"
                } else {
                    ""
                }
            )));
        }
    }
    lines.push(Line::raw(""));
    lines.push(Line::from(vec![
        Span::styled(" y ", Style::new().add_modifier(Modifier::REVERSED)),
        Span::raw(" drain   "),
        Span::styled(" n ", Style::new().add_modifier(Modifier::REVERSED)),
        Span::raw(" / Esc cancel"),
    ]));
    popup(
        centered(area, 90, 70),
        &format!(" Drain {}? ", plan.device),
        lines,
        0,
        buf,
    );
}
