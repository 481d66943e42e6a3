//! Keys → actions. The footer and the help overlay list the same bindings, from [`HELP`].

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use super::app::{Action, App, Overlay};

/// (keys, what they do), in the order the help shows them.
pub const HELP: &[(&str, &str)] = &[
    ("↑ ↓ / j k", "move in the focused pane (g G: first, last)"),
    (
        "Tab / S-Tab",
        "next / previous pane: devices, holders, event log",
    ),
    (
        "Enter",
        "devices: go to its holders; holders: detail of one holder",
    ),
    (
        "/",
        "filter holders and the log by pid, command or file (Esc clears)",
    ),
    ("s", "sort holders: pages, pid, command, file, last fault"),
    ("p", "pause the display (a replay stops its clock)"),
    (
        "d",
        "drain the selected device (asks first, shows who is signalled)",
    ),
    ("?", "this help"),
    ("q / Ctrl-C", "quit"),
];

/// The footer's short form.
pub const FOOTER: &[(&str, &str)] = &[
    ("↑↓", "move"),
    ("Tab", "pane"),
    ("⏎", "detail"),
    ("/", "filter"),
    ("s", "sort"),
    ("p", "pause"),
    ("d", "drain"),
    ("?", "help"),
    ("q", "quit"),
];

pub fn action(app: &App, key: KeyEvent) -> Option<Action> {
    if key.kind == KeyEventKind::Release {
        return None;
    }
    let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
    if ctrl && matches!(key.code, KeyCode::Char('c')) {
        return Some(Action::Quit);
    }
    if app.filter_edit.is_some() {
        return match key.code {
            KeyCode::Enter => Some(Action::FilterCommit),
            KeyCode::Esc => Some(Action::FilterCancel),
            KeyCode::Backspace => Some(Action::FilterBackspace),
            KeyCode::Char(c) if !ctrl => Some(Action::FilterChar(c)),
            _ => None,
        };
    }
    if let Overlay::ConfirmDrain(_) = app.overlay {
        return match key.code {
            KeyCode::Char('y') | KeyCode::Char('Y') => Some(Action::Confirm),
            KeyCode::Char('n') | KeyCode::Char('N') | KeyCode::Esc | KeyCode::Char('q') => {
                Some(Action::Back)
            }
            _ => None,
        };
    }
    Some(match key.code {
        KeyCode::Up | KeyCode::Char('k') => Action::Up,
        KeyCode::Down | KeyCode::Char('j') => Action::Down,
        KeyCode::Home | KeyCode::Char('g') => Action::Top,
        KeyCode::End | KeyCode::Char('G') => Action::Bottom,
        KeyCode::Tab => Action::NextPane,
        KeyCode::BackTab => Action::PrevPane,
        KeyCode::Enter => Action::Enter,
        KeyCode::Esc => Action::Back,
        KeyCode::Char('/') => Action::FilterStart,
        KeyCode::Char('s') => Action::Sort,
        KeyCode::Char('p') => Action::Pause,
        KeyCode::Char('d') => Action::Drain,
        KeyCode::Char('?') => Action::Help,
        KeyCode::Char('q') => Action::Quit,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{policy::Policy, ui::tui::app::Source};

    fn key(c: KeyCode) -> KeyEvent {
        KeyEvent::new(c, KeyModifiers::NONE)
    }

    #[test]
    fn keys_mean_different_things_while_typing_a_filter() {
        let mut app = App::new(Source::Live, Policy::default());
        assert_eq!(action(&app, key(KeyCode::Char('q'))), Some(Action::Quit));
        assert_eq!(action(&app, key(KeyCode::Char('j'))), Some(Action::Down));
        app.filter_edit = Some(String::new());
        assert_eq!(
            action(&app, key(KeyCode::Char('q'))),
            Some(Action::FilterChar('q'))
        );
        assert_eq!(action(&app, key(KeyCode::Esc)), Some(Action::FilterCancel));
        assert_eq!(
            action(
                &app,
                KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)
            ),
            Some(Action::Quit)
        );
    }
}
