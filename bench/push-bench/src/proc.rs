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

/// CPU seconds (user plus system) of each of `pids`, with its command name
/// (`/proc/<pid>/comm`); processes that are gone are left out.
pub fn cpu_by_pid(pids: &[String]) -> Vec<(String, String, f64)> {
    pids.iter()
        .filter_map(|p| {
            let u = one(p).ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).ok()?;
            Some((p.clone(), comm.trim().to_owned(), u.cpu()))
        })
        .collect()
}

/// CPU per push by command name between two [`cpu_by_pid`] readings, in
/// microseconds, as `name:µs,name:µs` (processes of one name summed, in
/// order of first appearance).
pub fn cpu_per_push_by_name(
    before: &[(String, String, f64)],
    after: &[(String, String, f64)],
    pushes: u64,
) -> String {
    let mut names: Vec<(String, f64)> = Vec::new();
    for (pid, name, cpu) in after {
        let was = before
            .iter()
            .find(|(p, _, _)| p == pid)
            .map_or(0.0, |b| b.2);
        match names.iter_mut().find(|(n, _)| n == name) {
            Some((_, sum)) => *sum += cpu - was,
            None => names.push((name.clone(), cpu - was)),
        }
    }
    names
        .iter()
        .map(|(n, s)| format!("{n}:{:.0}", s * 1e6 / pushes.max(1) as f64))
        .collect::<Vec<_>>()
        .join(",")
}
