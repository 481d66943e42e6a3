//! Formatting helpers shared by the panes.

use unicode_width::UnicodeWidthStr;

const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// The last `width` values as bars scaled to their maximum; zero is blank.
pub fn sparkline(history: &[u64], width: usize) -> String {
    let tail = &history[history.len().saturating_sub(width)..];
    let max = tail.iter().copied().max().unwrap_or(0);
    let mut s: String = tail
        .iter()
        .map(|&v| {
            if v == 0 || max == 0 {
                ' '
            } else {
                BARS[(((v as f64 / max as f64) * 7.0).round() as usize).min(7)]
            }
        })
        .collect();
    while s.chars().count() < width {
        s.insert(0, ' ');
    }
    s
}

/// Keeps the end of `s` (the file name matters more than the mount point).
pub fn tail(s: &str, width: usize) -> String {
    if s.width() <= width {
        return s.to_string();
    }
    if width == 0 {
        return String::new();
    }
    let mut out: Vec<char> = Vec::new();
    let mut w = 1;
    for c in s.chars().rev() {
        let cw = c.to_string().width();
        if w + cw > width {
            break;
        }
        w += cw;
        out.push(c);
    }
    out.push('…');
    out.into_iter().rev().collect()
}

/// `0.4s`, `12s`, `5m`, `3h` before `now`.
pub fn ago(now_ns: u64, ts_ns: Option<u64>) -> String {
    let Some(ts) = ts_ns else {
        return "-".into();
    };
    let d = now_ns.saturating_sub(ts) as f64 / 1e9;
    if d < 10.0 {
        format!("{d:.1}s ago")
    } else if d < 120.0 {
        format!("{d:.0}s ago")
    } else if d < 7200.0 {
        format!("{:.0}m ago", d / 60.0)
    } else {
        format!("{:.0}h ago", d / 3600.0)
    }
}

/// Seconds since boot, as dmesg and the monitor print them.
pub fn stamp(ts_ns: Option<u64>) -> String {
    match ts_ns {
        Some(t) => format!(
            "{:>6}.{:03}",
            t / 1_000_000_000,
            (t % 1_000_000_000) / 1_000_000
        ),
        None => " ".repeat(10),
    }
}

pub fn page_size(bytes: u64) -> &'static str {
    match bytes {
        b if b >= 1 << 30 => "1G",
        b if b >= 2 << 20 => "2M",
        _ => "4K",
    }
}

pub fn rate(r: f64) -> String {
    if r >= 10_000.0 {
        format!("{:.0}k", r / 1000.0)
    } else {
        format!("{r:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparkline_scales_to_the_window_max() {
        assert_eq!(sparkline(&[0, 1, 2, 4, 8], 5), " ▂▃▅█");
        assert_eq!(sparkline(&[5, 0, 0], 5), "  █  ");
        assert_eq!(sparkline(&[9, 9, 1, 2], 2), "▅█", "only the window counts");
        assert_eq!(sparkline(&[], 3), "   ");
    }

    #[test]
    fn tail_keeps_the_end() {
        assert_eq!(tail("/mnt/pmem0/data.bin", 30), "/mnt/pmem0/data.bin");
        assert_eq!(tail("/mnt/pmem0/data.bin", 10), "…/data.bin");
        assert_eq!(tail("abc", 0), "");
    }

    #[test]
    fn ages_read_naturally() {
        let s = 1_000_000_000;
        assert_eq!(ago(10 * s, Some(9 * s + s / 2)), "0.5s ago");
        assert_eq!(ago(100 * s, Some(10 * s)), "90s ago");
        assert_eq!(ago(1000 * s, Some(10 * s)), "16m ago");
        assert_eq!(ago(10 * s, None), "-");
        assert_eq!(stamp(Some(12_649_205_000)), "    12.649");
    }
}
