//! The dashboard's UI state: what is selected, sorted, filtered, paused, and which overlay is
//! open. It owns a [`Snapshot`] (frozen while paused) and never touches the model or the
//! terminal; keys become [`Action`]s, and actions that need the outside world come back as
//! [`Command`]s for the run loop.

use super::model::{DevState, HolderView, LogEntry, Snapshot};
use crate::{policy::Policy, topology::DevId};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pane {
    Devices,
    Holders,
    Log,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortKey {
    Pages,
    Pid,
    Comm,
    File,
    LastFault,
}

impl SortKey {
    pub fn next(self) -> Self {
        match self {
            SortKey::Pages => SortKey::Pid,
            SortKey::Pid => SortKey::Comm,
            SortKey::Comm => SortKey::File,
            SortKey::File => SortKey::LastFault,
            SortKey::LastFault => SortKey::Pages,
        }
    }
    pub fn label(self) -> &'static str {
        match self {
            SortKey::Pages => "pages",
            SortKey::Pid => "pid",
            SortKey::Comm => "comm",
            SortKey::File => "file",
            SortKey::LastFault => "last fault",
        }
    }
}

/// Where the data comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    Live,
    Replay {
        file: String,
        speed: f64,
        done: bool,
    },
}

/// Whose agent a live dashboard shows.
#[derive(Clone, Debug, PartialEq)]
pub enum Link {
    /// Its own, started because no monitor answered.
    Own,
    /// A running monitor's, through its control socket.
    Attached(String),
    /// The monitor it was attached to went away (why): nothing shown is live any more.
    Gone(String),
}

/// What a drain of the selected device will do, shown before it starts.
#[derive(Clone, Debug, PartialEq)]
pub struct DrainPlan {
    pub device: String,
    pub mount: Option<String>,
    pub signal: String,
    pub grace: String,
    pub then: Option<String>,
    /// Rows of the processes that will be signalled (one per process and file).
    pub holders: Vec<HolderView>,
    /// Processes the policy excludes from signals.
    pub excluded: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Overlay {
    None,
    Help,
    Detail,
    ConfirmDrain(DrainPlan),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Up,
    Down,
    Top,
    Bottom,
    NextPane,
    PrevPane,
    Enter,
    Back,
    FilterStart,
    FilterChar(char),
    FilterBackspace,
    FilterCommit,
    FilterCancel,
    Sort,
    Pause,
    Drain,
    Confirm,
    Help,
    Quit,
}

/// What the run loop must do for an action.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    Quit,
    Pause(bool),
    Drain(DrainPlan),
}

pub struct App {
    pub snap: Snapshot,
    pub source: Source,
    /// Live only: whose agent.
    pub link: Link,
    pub focus: Pane,
    /// Selected device, by name (stable while rows come and go).
    pub device: Option<String>,
    /// A device asked for (`--device`) that the data has not shown yet.
    pub want_device: Option<String>,
    /// Selected holder: (pid, file dev, inode).
    pub holder: Option<(u32, DevId, u64)>,
    /// Log lines scrolled back from the newest.
    pub log_back: usize,
    pub sort: SortKey,
    pub filter: String,
    /// Filter being typed.
    pub filter_edit: Option<String>,
    pub paused: bool,
    pub overlay: Overlay,
    pub detail_scroll: usize,
    /// One-line notice in the footer until the next key.
    pub message: Option<String>,
    pub policy: Policy,
}

impl App {
    pub fn new(source: Source, policy: Policy) -> Self {
        Self {
            snap: Snapshot::default(),
            source,
            link: Link::Own,
            focus: Pane::Devices,
            device: None,
            want_device: None,
            holder: None,
            log_back: 0,
            sort: SortKey::Pages,
            filter: String::new(),
            filter_edit: None,
            paused: false,
            overlay: Overlay::None,
            detail_scroll: 0,
            message: None,
            policy,
        }
    }

    /// New data; ignored while paused.
    pub fn update(&mut self, snap: Snapshot) {
        if self.paused {
            return;
        }
        self.snap = snap;
        self.fix_selection();
    }

    /// Selects `name` now, or as soon as it appears.
    pub fn select_device(&mut self, name: Option<String>) {
        self.want_device = name;
        self.fix_selection();
    }

    fn fix_selection(&mut self) {
        if let Some(w) = &self.want_device
            && self.snap.devices.iter().any(|d| &d.name == w)
        {
            self.device = self.want_device.take();
            self.holder = None;
        }
        if self.device_index().is_none() {
            self.device = self.snap.devices.first().map(|d| d.name.clone());
            self.holder = None;
        }
        let hs = self.holders();
        let keep = self
            .holder
            .is_some_and(|k| hs.iter().any(|h| (h.pid, h.dev, h.ino) == k));
        if !keep {
            self.holder = hs.first().map(|h| (h.pid, h.dev, h.ino));
        }
    }

    pub fn device_index(&self) -> Option<usize> {
        let name = self.device.as_deref()?;
        self.snap.devices.iter().position(|d| d.name == name)
    }

    fn matches(&self, h: &HolderView) -> bool {
        let f = self.filter.trim();
        if f.is_empty() {
            return true;
        }
        let f = f.to_lowercase();
        h.pid.to_string() == f
            || h.comm.to_lowercase().contains(&f)
            || h.file
                .as_deref()
                .is_some_and(|p| p.to_lowercase().contains(&f))
    }

    /// Holders of the selected device, filtered and sorted.
    pub fn holders(&self) -> Vec<&HolderView> {
        let Some(i) = self.device_index() else {
            return Vec::new();
        };
        let mut hs: Vec<&HolderView> = self.snap.holders[i]
            .iter()
            .filter(|h| self.matches(h))
            .collect();
        match self.sort {
            SortKey::Pages => hs.sort_by(|a, b| b.pages.cmp(&a.pages).then(a.pid.cmp(&b.pid))),
            SortKey::Pid => hs.sort_by_key(|h| (h.pid, h.file.clone())),
            SortKey::Comm => hs.sort_by(|a, b| a.comm.cmp(&b.comm).then(a.pid.cmp(&b.pid))),
            SortKey::File => hs.sort_by(|a, b| a.file.cmp(&b.file).then(a.pid.cmp(&b.pid))),
            SortKey::LastFault => hs.sort_by(|a, b| {
                b.last_fault_ns
                    .cmp(&a.last_fault_ns)
                    .then(a.pid.cmp(&b.pid))
            }),
        }
        hs
    }

    pub fn holder_index(&self) -> Option<usize> {
        let k = self.holder?;
        self.holders()
            .iter()
            .position(|h| (h.pid, h.dev, h.ino) == k)
    }

    pub fn selected_holder(&self) -> Option<&HolderView> {
        let k = self.holder?;
        self.holders()
            .into_iter()
            .find(|h| (h.pid, h.dev, h.ino) == k)
    }

    /// Log entries the filter lets through, oldest first.
    pub fn log(&self) -> Vec<&LogEntry> {
        let f = self.filter.trim().to_lowercase();
        self.snap
            .log
            .iter()
            .filter(|e| f.is_empty() || e.text.to_lowercase().contains(&f))
            .collect()
    }

    fn move_by(&mut self, delta: isize) {
        match self.focus {
            Pane::Devices => {
                let n = self.snap.devices.len();
                if n == 0 {
                    return;
                }
                let i = self.device_index().unwrap_or(0);
                let j = (i as isize + delta).clamp(0, n as isize - 1) as usize;
                if j != i {
                    self.device = Some(self.snap.devices[j].name.clone());
                    self.holder = None;
                    self.fix_selection();
                }
            }
            Pane::Holders => {
                let hs = self.holders();
                if hs.is_empty() {
                    return;
                }
                let i = self.holder_index().unwrap_or(0);
                let j = (i as isize + delta).clamp(0, hs.len() as isize - 1) as usize;
                self.holder = Some((hs[j].pid, hs[j].dev, hs[j].ino));
            }
            Pane::Log => {
                let n = self.log().len();
                // Up scrolls back into older lines.
                let back = (self.log_back as isize - delta).clamp(0, n.saturating_sub(1) as isize);
                self.log_back = back as usize;
            }
        }
    }

    fn drain_plan(&self) -> Result<DrainPlan, String> {
        let i = self
            .device_index()
            .ok_or_else(|| "no device selected".to_string())?;
        let d = &self.snap.devices[i];
        if matches!(self.source, Source::Replay { .. }) {
            return Err(
                "drain acts on the machine: it needs the live dashboard, not a replay".into(),
            );
        }
        if matches!(d.state, DevState::Gone | DevState::Departing) {
            return Err(format!(
                "{} is {}: nothing to drain",
                d.name,
                d.state.label()
            ));
        }
        let rule = self
            .policy
            .rule_for(&[d.name.as_str(), d.namespace.as_str()]);
        let excluded = self.snap.holders[i]
            .iter()
            .filter(|h| rule.exclude.iter().any(|x| x.matches(h.pid, &h.comm)))
            .map(|h| h.pid)
            .collect();
        Ok(DrainPlan {
            device: d.name.clone(),
            mount: d.mount.clone(),
            signal: rule.signal.to_string(),
            grace: format!("{:?}", rule.grace),
            then: rule.escalate.map(|s| s.to_string()),
            holders: self.snap.holders[i].clone(),
            excluded,
        })
    }

    /// Applies an action; returns what the run loop must do, if anything.
    pub fn handle(&mut self, a: Action) -> Option<Command> {
        self.message = None;
        if let Overlay::ConfirmDrain(plan) = &self.overlay {
            return match a {
                Action::Confirm => {
                    let plan = plan.clone();
                    self.overlay = Overlay::None;
                    Some(Command::Drain(plan))
                }
                Action::Quit | Action::Back => {
                    self.overlay = Overlay::None;
                    self.message = Some("drain cancelled: nothing was signalled".into());
                    None
                }
                _ => None,
            };
        }
        match a {
            Action::Quit => return Some(Command::Quit),
            Action::Help => {
                self.overlay = if self.overlay == Overlay::Help {
                    Overlay::None
                } else {
                    Overlay::Help
                };
            }
            Action::Back => {
                if self.overlay != Overlay::None {
                    self.overlay = Overlay::None;
                } else if !self.filter.is_empty() {
                    self.filter.clear();
                    self.fix_selection();
                }
            }
            _ if self.overlay == Overlay::Help => self.overlay = Overlay::None,
            Action::Up if self.overlay == Overlay::Detail => {
                self.detail_scroll = self.detail_scroll.saturating_sub(1)
            }
            Action::Down if self.overlay == Overlay::Detail => self.detail_scroll += 1,
            Action::Enter if self.overlay == Overlay::Detail => self.overlay = Overlay::None,
            Action::Up => self.move_by(-1),
            Action::Down => self.move_by(1),
            Action::Top => self.move_by(-(1 << 20)),
            Action::Bottom => self.move_by(1 << 20),
            Action::NextPane | Action::PrevPane => {
                let order = [Pane::Devices, Pane::Holders, Pane::Log];
                let i = order.iter().position(|p| *p == self.focus).unwrap_or(0);
                let step = if a == Action::NextPane { 1 } else { 2 };
                self.focus = order[(i + step) % 3];
            }
            Action::Enter => match self.focus {
                Pane::Devices => self.focus = Pane::Holders,
                Pane::Holders => {
                    if self.selected_holder().is_some() {
                        self.overlay = Overlay::Detail;
                        self.detail_scroll = 0;
                    }
                }
                Pane::Log => {}
            },
            Action::FilterStart => self.filter_edit = Some(self.filter.clone()),
            Action::FilterChar(c) => {
                if let Some(f) = &mut self.filter_edit {
                    f.push(c);
                }
            }
            Action::FilterBackspace => {
                if let Some(f) = &mut self.filter_edit {
                    f.pop();
                }
            }
            Action::FilterCommit => {
                if let Some(f) = self.filter_edit.take() {
                    self.filter = f;
                    self.log_back = 0;
                    self.fix_selection();
                }
            }
            Action::FilterCancel => self.filter_edit = None,
            Action::Sort => {
                self.sort = self.sort.next();
                self.message = Some(format!("holders sorted by {}", self.sort.label()));
            }
            Action::Pause => {
                self.paused = !self.paused;
                return Some(Command::Pause(self.paused));
            }
            Action::Drain => match self.drain_plan() {
                Ok(p) => self.overlay = Overlay::ConfirmDrain(p),
                Err(e) => self.message = Some(e),
            },
            Action::Confirm => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        topology::Mode,
        ui::tui::model::{DeviceView, FeedStats},
    };

    fn holder(pid: u32, comm: &str, file: &str, pages: u64, last: u64) -> HolderView {
        HolderView {
            pid,
            start_time: 0,
            comm: comm.into(),
            file: Some(file.into()),
            dev: DevId {
                major: 259,
                minor: 0,
            },
            ino: pid as u64,
            pages,
            page_size: 4096,
            last_fault_ns: Some(last),
            offsets: vec![(0, pages << 12)],
            extents: Vec::new(),
            workload: None,
        }
    }

    fn device(name: &str, state: DevState) -> DeviceView {
        DeviceView {
            name: name.into(),
            namespace: format!("namespace-{name}"),
            mode: Mode::Fsdax,
            size: Some(1 << 30),
            mount: Some(format!("/mnt/{name}")),
            state,
            holders: 0,
            pages: 0,
            faults_per_sec: 0.0,
            history: vec![0; 4],
        }
    }

    fn snap() -> Snapshot {
        Snapshot {
            devices: vec![
                device("pmem0", DevState::Online),
                device("pmem1", DevState::Gone),
            ],
            holders: vec![
                vec![
                    holder(30, "db", "/mnt/pmem0/a", 10, 5),
                    holder(10, "cache", "/mnt/pmem0/b", 500, 9),
                    holder(20, "backup", "/mnt/pmem0/c", 10, 7),
                ],
                vec![holder(40, "old", "/mnt/pmem1/x", 1, 1)],
            ],
            log: Vec::new(),
            stats: FeedStats::default(),
            now_ns: 10,
            kernel: None,
        }
    }

    fn live() -> App {
        let mut a = App::new(Source::Live, Policy::default());
        a.update(snap());
        a
    }

    fn pids(a: &App) -> Vec<u32> {
        a.holders().iter().map(|h| h.pid).collect()
    }

    #[test]
    fn selection_starts_at_the_first_rows_and_follows_keys() {
        let mut a = live();
        assert_eq!(a.device.as_deref(), Some("pmem0"));
        assert_eq!(pids(&a), vec![10, 20, 30]); // most pages first, then pid
        assert_eq!(a.holder_index(), Some(0));
        a.handle(Action::Down);
        assert_eq!(a.device.as_deref(), Some("pmem1"));
        assert_eq!(a.selected_holder().unwrap().pid, 40);
        a.handle(Action::Down); // stays on the last row
        assert_eq!(a.device.as_deref(), Some("pmem1"));
        a.handle(Action::Up);
        a.handle(Action::NextPane);
        assert_eq!(a.focus, Pane::Holders);
        a.handle(Action::Bottom);
        assert_eq!(a.selected_holder().unwrap().pid, 30);
        a.handle(Action::Enter);
        assert_eq!(a.overlay, Overlay::Detail);
        a.handle(Action::Back);
        assert_eq!(a.overlay, Overlay::None);
    }

    #[test]
    fn selection_sticks_to_the_same_holder_when_rows_move() {
        let mut a = live();
        a.focus = Pane::Holders;
        a.handle(Action::Down);
        assert_eq!(a.selected_holder().unwrap().pid, 20);
        let mut s = snap();
        s.holders[0][2].pages = 1000; // pid 20 now first
        a.update(s);
        assert_eq!(a.selected_holder().unwrap().pid, 20);
        assert_eq!(a.holder_index(), Some(0));
        let mut s = snap();
        s.holders[0].retain(|h| h.pid != 20); // it went away: first row
        a.update(s);
        assert_eq!(a.selected_holder().unwrap().pid, 10);
    }

    #[test]
    fn a_device_asked_for_is_selected_once_it_appears() {
        let mut a = App::new(Source::Live, Policy::default());
        a.select_device(Some("pmem1".into()));
        a.update(Snapshot::default()); // no topology yet
        assert_eq!(a.device, None);
        a.update(snap());
        assert_eq!(a.device.as_deref(), Some("pmem1"));
        assert_eq!(a.selected_holder().unwrap().pid, 40);
        a.handle(Action::Up); // the operator moves on: it stays where they put it
        a.update(snap());
        assert_eq!(a.device.as_deref(), Some("pmem0"));
    }

    #[test]
    fn sort_cycles_through_keys() {
        let mut a = live();
        a.handle(Action::Sort);
        assert_eq!(a.sort, SortKey::Pid);
        assert_eq!(pids(&a), vec![10, 20, 30]);
        a.handle(Action::Sort);
        assert_eq!(pids(&a), vec![20, 10, 30]); // backup, cache, db
        a.handle(Action::Sort);
        assert_eq!(pids(&a), vec![30, 10, 20]); // a, b, c
        a.handle(Action::Sort);
        assert_eq!(pids(&a), vec![10, 20, 30]); // newest fault first: 9, 7, 5
        a.handle(Action::Sort);
        assert_eq!(a.sort, SortKey::Pages);
    }

    #[test]
    fn filter_matches_comm_file_or_pid_and_can_be_cancelled() {
        let mut a = live();
        a.handle(Action::FilterStart);
        for c in "DB".chars() {
            a.handle(Action::FilterChar(c));
        }
        assert_eq!(pids(&a), vec![10, 20, 30], "not applied while typing");
        a.handle(Action::FilterCommit);
        assert_eq!(pids(&a), vec![30]);
        assert_eq!(a.selected_holder().unwrap().pid, 30);
        a.handle(Action::FilterStart);
        a.handle(Action::FilterBackspace);
        a.handle(Action::FilterBackspace);
        a.handle(Action::FilterChar('2'));
        a.handle(Action::FilterChar('0'));
        a.handle(Action::FilterCommit);
        assert_eq!(pids(&a), vec![20]);
        a.handle(Action::FilterStart);
        a.handle(Action::FilterChar('x'));
        a.handle(Action::FilterCancel);
        assert_eq!(a.filter, "20");
        a.handle(Action::Back);
        assert_eq!(a.filter, "");
        assert_eq!(pids(&a).len(), 3);
    }

    #[test]
    fn pause_freezes_the_snapshot() {
        let mut a = live();
        assert_eq!(a.handle(Action::Pause), Some(Command::Pause(true)));
        let mut s = snap();
        s.holders[0].clear();
        a.update(s.clone());
        assert_eq!(pids(&a).len(), 3);
        assert_eq!(a.handle(Action::Pause), Some(Command::Pause(false)));
        a.update(s);
        assert!(pids(&a).is_empty());
    }

    #[test]
    fn drain_asks_first_and_names_who_is_signalled() {
        let mut a = live();
        assert_eq!(a.handle(Action::Drain), None);
        let Overlay::ConfirmDrain(plan) = a.overlay.clone() else {
            panic!("no confirmation: {:?}", a.overlay)
        };
        assert_eq!(plan.device, "pmem0");
        assert_eq!(plan.signal, "SIGTERM");
        assert_eq!(plan.then.as_deref(), Some("SIGKILL"));
        assert_eq!(plan.holders.len(), 3);
        // Anything but yes cancels nothing and starts nothing.
        assert_eq!(a.handle(Action::Down), None);
        assert_eq!(a.handle(Action::Back), None);
        assert_eq!(a.overlay, Overlay::None);
        a.handle(Action::Drain);
        assert_eq!(a.handle(Action::Confirm), Some(Command::Drain(plan)));
        // A gone device cannot be drained; neither can anything in a replay.
        a.handle(Action::Down);
        assert_eq!(a.handle(Action::Drain), None);
        assert!(a.message.as_deref().unwrap().contains("gone"));
        let mut r = App::new(
            Source::Replay {
                file: "x".into(),
                speed: 1.0,
                done: false,
            },
            Policy::default(),
        );
        r.update(snap());
        r.handle(Action::Drain);
        assert_eq!(r.overlay, Overlay::None);
        assert!(r.message.as_deref().unwrap().contains("replay"));
    }
}
