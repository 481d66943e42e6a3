//! The dashboard rendered with ratatui's TestBackend-equivalent buffer and compared with
//! reviewed text snapshots in tests/snapshots/ (`UPDATE_SNAPSHOTS=1` rewrites them; review
//! the diff before committing). Styles are not compared, only what a reader sees.

use std::path::PathBuf;

use dax_probe::{
    policy::Policy,
    ui::tui::{
        app::{Action, App, Overlay, Pane, Source},
        model::Model,
        replay,
        view::{frame, to_text},
    },
};
use ratatui::{Terminal, backend::TestBackend};

const FIXTURE: &str = include_str!("fixtures/monitor-6.12.jsonl");

fn replayed() -> (Model, App) {
    let mut model = Model::new();
    let check = replay::load_str(&mut model, FIXTURE);
    assert!(check.disagreed.is_empty(), "{:?}", check.disagreed);
    let mut app = App::new(
        Source::Replay {
            file: "tests/fixtures/monitor-6.12.jsonl".into(),
            speed: 1.0,
            done: true,
        },
        Policy::default(),
    );
    app.update(model.snapshot());
    (model, app)
}

/// Renders through a real `Terminal<TestBackend>`, as the run loop draws.
fn render(app: &App, w: u16, h: u16) -> String {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| f.render_widget(app, f.area())).unwrap();
    let text = to_text(t.backend().buffer());
    // The terminal path and the plain buffer path draw the same.
    assert_eq!(text, to_text(&frame(app, w, h)));
    text
}

fn check(name: &str, got: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(format!("{name}.txt"));
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "no snapshot {}; run with UPDATE_SNAPSHOTS=1 and review it\n{got}",
            path.display()
        )
    });
    if want != got {
        let diff: Vec<String> = want
            .lines()
            .zip(got.lines())
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, (a, b))| format!("line {}:\n  want |{a}|\n  got  |{b}|", i + 1))
            .collect();
        panic!(
            "{name} differs from {}:\n{}\n(lines: want {}, got {}; UPDATE_SNAPSHOTS=1 rewrites)",
            path.display(),
            diff.join("\n"),
            want.lines().count(),
            got.lines().count()
        );
    }
}

#[test]
fn devices_and_holders_at_80x24() {
    let (_, app) = replayed();
    let text = render(&app, 80, 24);
    check("replay_80x24", &text);
    assert!(text.contains("pmem2") && text.contains("gone"), "{text}");
}

#[test]
fn wide_terminal_shows_more_history_and_whole_paths() {
    let (_, mut app) = replayed();
    app.select_device(Some("pmem2".into()));
    app.focus = Pane::Holders;
    check("replay_140x36_pmem2", &render(&app, 140, 36));
}

#[test]
fn holder_detail_lists_ranges_pfns_and_offsets() {
    let (_, mut app) = replayed();
    app.handle(Action::Enter); // devices → holders
    app.handle(Action::Down); // 165 dax-workload
    app.handle(Action::Enter);
    assert_eq!(app.overlay, Overlay::Detail);
    let text = render(&app, 100, 30);
    check("detail_100x30", &text);
    assert!(text.contains("0x109000"), "{text}");
}

#[test]
fn help_at_80x24() {
    let (_, mut app) = replayed();
    app.handle(Action::Help);
    check("help_80x24", &render(&app, 80, 24));
}

#[test]
fn too_small_says_so() {
    let (_, app) = replayed();
    let text = render(&app, 50, 12);
    check("too_small_50x12", &text);
    assert!(text.contains("50x12"));
}

#[test]
fn empty_live_dashboard() {
    let mut app = App::new(Source::Live, Policy::default());
    app.update(Model::new().snapshot());
    check("empty_live_80x24", &render(&app, 80, 24));
}

#[test]
fn drain_confirmation_names_who_is_signalled() {
    let (mut model, _) = replayed();
    let mut app = App::new(Source::Live, Policy::default());
    app.update(model.snapshot());
    app.handle(Action::Drain);
    assert!(matches!(app.overlay, Overlay::ConfirmDrain(_)));
    let text = render(&app, 80, 24);
    check("confirm_drain_80x24", &text);
    assert!(
        text.contains("150 postgres") && text.contains("165 dax-workload"),
        "{text}"
    );
}

#[test]
fn filter_sort_and_pause_show_in_the_frame() {
    let (_, mut app) = replayed();
    app.handle(Action::FilterStart);
    for c in "log".chars() {
        app.handle(Action::FilterChar(c));
    }
    app.handle(Action::FilterCommit);
    app.handle(Action::Sort);
    app.handle(Action::Pause);
    check("filtered_paused_80x24", &render(&app, 80, 24));
}

#[test]
fn holder_detail_names_pod_and_container_when_known() {
    let (_, mut app) = replayed();
    app.handle(Action::Enter);
    app.handle(Action::Down);
    app.handle(Action::Enter);
    // A replay has no /proc: the line is absent, as the snapshot above shows.
    assert!(!render(&app, 100, 30).contains("│workload "));
    for h in app.snap.holders.iter_mut().flatten() {
        h.workload = Some("pod 1b2c3d4e-5f60 container containerd:0123456789ab".into());
    }
    let text = render(&app, 100, 30);
    assert!(
        text.contains("workload   pod 1b2c3d4e-5f60 container containerd:0123456789ab"),
        "{text}"
    );
}
