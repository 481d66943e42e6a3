//! `dax-probe tui`: the operator's dashboard (devices, holders, fault rates, events), live
//! or replayed from a `monitor --json` recording.
//!
//! State is separate from drawing: [`model`] builds what is known from JSON lines,
//! [`app`] holds the UI state, [`view`] draws `&App`. Live, the dashboard attaches to the
//! running monitor through its control socket (one set of kernel programs per machine) and
//! starts an agent of its own, on its own thread, only when none answers ([`feed`]); either
//! way the agent never waits for the terminal.

pub mod app;
pub mod feed;
pub mod keys;
pub mod model;
pub mod record;
pub mod recorded;
pub mod replay;
pub mod term;
pub mod view;

use std::{
    io::IsTerminal,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{Receiver, SyncSender, sync_channel},
    },
    time::{Duration, Instant},
};

use ratatui::crossterm::event::{self, Event as TermEvent};

use self::{
    app::{App, Command, Link, Source},
    feed::{Attach, CHANNEL_CAP, FeedMsg, Live},
    model::{FeedStats, Model},
    record::LogKind,
};
use crate::{
    agent,
    exit::{Code, Failure},
    policy::{Policy, enforce::boottime_ns},
    privilege,
    probe::KernelSource,
    schema::Line,
};

/// A frame at least this often, and the longest a change waits to be shown.
pub const FRAME: Duration = Duration::from_millis(200);
/// Messages taken per loop turn before drawing again (a burst cannot freeze the screen).
const BATCH: usize = 20_000;

pub struct Options {
    pub replay: Option<PathBuf>,
    pub speed: f64,
    /// Select this device at start.
    pub device: Option<String>,
    pub policy: Policy,
    pub policy_path: Option<PathBuf>,
    /// Print one frame of the replayed end state (columns, rows) and exit.
    pub print_frame: Option<(u16, u16)>,
    /// The running monitor's control socket, tried first.
    pub socket: PathBuf,
    pub agent: agent::Options,
}

pub fn run(src: &KernelSource, opts: Options) -> anyhow::Result<()> {
    if let Some(path) = &opts.replay {
        if !(opts.speed > 0.0 && opts.speed.is_finite()) {
            return Err(Failure::new(
                Code::Usage,
                format!("--speed must be a positive number, not {}", opts.speed),
            )
            .into());
        }
        if let Err(e) = std::fs::File::open(path) {
            return Err(Failure::new(
                Code::NoInput,
                format!("cannot read the recording {}: {e}", path.display()),
            )
            .into());
        }
    }
    if let Some((w, h)) = opts.print_frame {
        return print_frame(&opts, w, h);
    }
    if opts.replay.is_none() && !privilege::can_trace() {
        return Err(Failure::new(
            Code::NoPermission,
            "the live dashboard loads eBPF programs and needs root (or CAP_BPF with \
             CAP_PERFMON and CAP_SYS_ADMIN): run it with sudo. Without root, study a \
             recording: `sudo dax-probe monitor --json > session.jsonl` on the server, \
             then `dax-probe tui --replay session.jsonl` anywhere",
        )
        .into());
    }
    if !std::io::stdout().is_terminal() {
        return Err(Failure::new(
            Code::Usage,
            "the dashboard draws on a terminal and stdout is not one: use `dax-probe monitor \
             --json` for a stream, or run it in a terminal (tmux, ssh -t)",
        )
        .into());
    }
    let source = match &opts.replay {
        Some(p) => Source::Replay {
            file: p.display().to_string(),
            speed: opts.speed,
            done: false,
        },
        None => Source::Live,
    };
    let mut app = App::new(source, opts.policy.clone());
    app.select_device(opts.device.clone());
    let paused = Arc::new(AtomicBool::new(false));
    let quit = Arc::new(AtomicBool::new(false));
    let mut attach = None;
    let (mut live, rx, tx) = match &opts.replay {
        None => {
            let (tx, rx) = sync_channel(CHANNEL_CAP);
            match Attach::start(&opts.socket, tx.clone())? {
                Some(a) => {
                    app.link = Link::Attached(a.socket.display().to_string());
                    attach = Some(a);
                    (None, rx, tx)
                }
                None => {
                    eprintln!(
                        "dax-probe: no monitor answers on {}: starting an agent of its own \
                         (this takes a moment on a slow machine)…",
                        opts.socket.display()
                    );
                    let mut l = Live::start(src.clone(), opts.agent)?;
                    let rx = std::mem::replace(&mut l.rx, sync_channel(1).1);
                    let tx = l.tx.clone();
                    (Some(l), rx, tx)
                }
            }
        }
        Some(path) => {
            let (tx, rx) = sync_channel(CHANNEL_CAP);
            replay::spawn(
                path.clone(),
                opts.speed,
                paused.clone(),
                quit.clone(),
                tx.clone(),
            )?;
            (None, rx, tx)
        }
    };
    term::catch_signals();
    let mut model = Model::new();
    let result = {
        let mut guard = term::Guard::enter()?;
        let mut ctl = Control {
            rx,
            tx,
            paused,
            policy_path: opts.policy_path.clone(),
            draining: None,
            live: live.is_some(),
        };
        ui_loop(&mut guard, &mut model, &mut app, &mut ctl)
    };
    quit.store(true, Ordering::Relaxed);
    if let Some(l) = &mut live {
        l.stop();
    }
    if let Some(a) = &mut attach {
        a.stop();
    }
    eprintln!("{}", exit_line(&model.stats));
    if let Some(line) = link_line(&app.link, &opts.socket, opts.replay.is_none()) {
        eprintln!("{line}");
    }
    result
}

/// Whose agent the live dashboard showed, for its last words.
pub fn link_line(link: &Link, socket: &std::path::Path, live: bool) -> Option<String> {
    if !live {
        return None;
    }
    Some(match link {
        Link::Own => format!(
            "dax-probe tui: ran an agent of its own (no monitor answered on {})",
            socket.display()
        ),
        Link::Attached(s) => format!(
            "dax-probe tui: attached to the running monitor on {s} (no second set of kernel \
             programs loaded)"
        ),
        Link::Gone(why) => format!("dax-probe tui: was attached to a monitor; {why}"),
    })
}

/// The last words: what was read and what was lost, kernel and UI apart.
pub fn exit_line(s: &FeedStats) -> String {
    format!(
        "dax-probe tui: {} lines read, {} malformed line(s) skipped, {} of unknown type; \
         kernel drops {}; ui lag {} line(s)",
        s.lines, s.malformed, s.unknown, s.kernel_dropped, s.ui_lag
    )
}

struct Control {
    rx: Receiver<FeedMsg>,
    tx: SyncSender<FeedMsg>,
    paused: Arc<AtomicBool>,
    policy_path: Option<PathBuf>,
    /// The device a drain started from here works on.
    draining: Option<String>,
    live: bool,
}

fn ui_loop(
    guard: &mut term::Guard,
    model: &mut Model,
    app: &mut App,
    ctl: &mut Control,
) -> anyhow::Result<()> {
    let mut last_draw: Option<Instant> = None;
    let mut ui_changed = true;
    loop {
        let t = Instant::now();
        for _ in 0..BATCH {
            let Ok(msg) = ctl.rx.try_recv() else { break };
            match msg {
                FeedMsg::Line(l) => model.ingest_line(*l),
                FeedMsg::Text(l) => {
                    let _ = model.ingest(&l);
                }
                FeedMsg::Clock(ns) => model.set_clock(ns),
                FeedMsg::Lagged(n) => model.lagged(n),
                FeedMsg::Note(k, text) => model.note(k, text),
                FeedMsg::Drain(l) => match record::parse_line(&l) {
                    Ok(line) => {
                        if let Line::Drain(step) = &line
                            && step.is_fence()
                            && let Some(d) = &ctl.draining
                        {
                            model.mark_fenced(d);
                        }
                        model.ingest_line(line);
                    }
                    // Not a line of ours (a message from the child): show it as it is.
                    Err(_) => model.note(LogKind::Drain, l),
                },
                FeedMsg::AgentGone(why) => {
                    model.note(
                        LogKind::Info,
                        format!("{why}: the map shown is the last one seen, not live"),
                    );
                    app.link = Link::Gone(why);
                    ui_changed = true;
                }
                FeedMsg::Ended(err) => {
                    if ctl.live {
                        return match err {
                            Some(e) => Err(anyhow::anyhow!("the agent stopped: {e}")),
                            None => Ok(()),
                        };
                    }
                    if let Source::Replay { done, .. } = &mut app.source {
                        *done = true;
                    }
                    ui_changed = true;
                }
            }
            if t.elapsed() > Duration::from_millis(50) {
                break;
            }
        }
        if ctl.live || matches!(app.link, Link::Attached(_)) {
            model.set_clock(boottime_ns());
        }
        if term::signalled().is_some() {
            return Ok(());
        }
        let due = last_draw.is_none_or(|d| d.elapsed() >= FRAME);
        if ui_changed || due {
            if !app.paused && (model.dirty() || last_draw.is_none()) {
                app.update(model.snapshot());
            }
            guard.terminal.draw(|f| f.render_widget(&*app, f.area()))?;
            last_draw = Some(Instant::now());
            ui_changed = false;
        }
        if event::poll(Duration::from_millis(40))? {
            match event::read()? {
                TermEvent::Key(k) => {
                    if let Some(a) = keys::action(app, k) {
                        ui_changed = true;
                        match app.handle(a) {
                            Some(Command::Quit) => return Ok(()),
                            Some(Command::Pause(p)) => ctl.paused.store(p, Ordering::Relaxed),
                            Some(Command::Drain(plan)) => {
                                ctl.draining = Some(plan.device.clone());
                                model.note(
                                    LogKind::Drain,
                                    format!("starting a drain of {}", plan.device),
                                );
                                if let Err(e) = feed::spawn_drain(
                                    &plan.device,
                                    plan.mount.is_some(),
                                    ctl.policy_path.as_deref(),
                                    ctl.tx.clone(),
                                ) {
                                    model.note(
                                        LogKind::Drain,
                                        format!("cannot start the drain: {e}"),
                                    );
                                }
                            }
                            None => {}
                        }
                    }
                }
                TermEvent::Resize(..) => ui_changed = true,
                _ => {}
            }
        }
    }
}

/// `--print-frame`: the replayed end state as text, no terminal needed.
fn print_frame(opts: &Options, w: u16, h: u16) -> anyhow::Result<()> {
    let Some(path) = &opts.replay else {
        return Err(Failure::new(Code::Usage, "--print-frame needs --replay FILE").into());
    };
    let mut model = Model::new();
    let check = replay::load(&mut model, path)?;
    let mut app = App::new(
        Source::Replay {
            file: path.display().to_string(),
            speed: opts.speed,
            done: true,
        },
        opts.policy.clone(),
    );
    app.select_device(opts.device.clone());
    app.update(model.snapshot());
    print!("{}", view::to_text(&view::frame(&app, w, h)));
    eprintln!("{}", exit_line(&model.stats));
    eprintln!(
        "dax-probe tui: replay check: {} departure report(s) agree with the replayed holders, \
         {} disagree{}",
        check.agreed,
        check.disagreed.len(),
        check
            .disagreed
            .iter()
            .map(|d| format!("\n  {d}"))
            .collect::<String>()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(link: Link) -> String {
        let mut app = App::new(Source::Live, Policy::default());
        app.link = link;
        let text = view::to_text(&view::frame(&app, 120, 30));
        text.lines().next().unwrap_or_default().to_string()
    }

    #[test]
    fn the_status_line_and_the_last_words_say_whose_agent() {
        let sock = std::path::Path::new("/run/dax-probe/agent.sock");
        assert!(header(Link::Own).contains("│ live/own agent │"));
        let attached = Link::Attached(sock.display().to_string());
        assert!(header(attached.clone()).contains("│ live/attached │"));
        let gone = header(Link::Gone("the monitor went away".into()));
        assert!(gone.contains("AGENT GONE: not live"), "{gone}");
        assert!(!gone.contains("live/"), "{gone}");
        let own = link_line(&Link::Own, sock, true).unwrap();
        assert!(
            own.contains("of its own") && own.contains("agent.sock"),
            "{own}"
        );
        let att = link_line(&attached, sock, true).unwrap();
        assert!(att.contains("attached to the running monitor on /run/dax-probe/agent.sock"));
        assert!(
            link_line(&Link::Own, sock, false).is_none(),
            "a replay has no agent"
        );
    }
}
