//! Memory and CPU of processes, from /proc.

/// Memory (KiB) and CPU seconds of one or more processes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// Proportional set size: shared pages (nginx's shared memory zone,
    /// libraries) are split between the processes that map them, so summing
    /// over a master and its workers counts them once.
    pub pss_kib: u64,
    pub rss_kib: u64,
    pub user: f64,
    pub system: f64,
}

impl Usage {
    /// User plus system CPU seconds.
    pub fn cpu(&self) -> f64 {
        self.user + self.system
    }
}

fn field_kib(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn one(pid: &str) -> std::io::Result<Usage> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start at ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = 100.0; // USER_HZ on Linux
    let secs = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / ticks;
    Ok(Usage {
        pss_kib: field_kib(&rollup, "Pss:"),
        rss_kib: field_kib(&rollup, "Rss:"),
        user: secs(11),
        system: secs(12),
    })
}

/// Sums over `pids`; processes that are gone count as nothing.
pub fn usage(pids: &[String]) -> Usage {
    pids.iter()
        .filter_map(|p| one(p).ok())
        .fold(Usage::default(), |a, u| Usage {
            pss_kib: a.pss_kib + u.pss_kib,
            rss_kib: a.rss_kib + u.rss_kib,
            user: a.user + u.user,
            system: a.system + u.system,
        })
}

/// CPU seconds (user, system) spent between two readings.
pub fn delta(a: Usage, b: Usage) -> (f64, f64) {
    (b.user - a.user, b.system - a.system)
}
