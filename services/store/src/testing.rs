//! Test support: a real `redis-server` on a free loopback port, stopped on drop.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` child process.
pub struct RedisServer {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    _dir: Option<std::path::PathBuf>,
}

/// First and last port handed out: below Linux's ephemeral range (32768 up),
/// so no outgoing connection and no bind to port 0 can take a port while a
/// test restarts the process that listens on it. (Taking ports from the
/// ephemeral range made a SIGKILL-and-restart test flaky: the freed port was
/// sometimes in use by another test's connection when the process came back.)
const PORTS: std::ops::RangeInclusive<u16> = 20000..=32767;

/// A TCP port on 127.0.0.1 that is free now and that this process has not
/// handed out before. Each test process walks the range from its own
/// starting point, so parallel test processes rarely meet.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let span = u32::from(PORTS.end() - PORTS.start()) + 1;
    let start = {
        let seed = std::process::id().wrapping_mul(2_654_435_761)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
        seed % span
    };
    let _ = NEXT.compare_exchange(u32::MAX, start, Ordering::SeqCst, Ordering::SeqCst);
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::SeqCst) % span;
        let port = PORTS.start() + n as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {PORTS:?} on 127.0.0.1")
}

impl RedisServer {
    /// Starts `redis-server` (no persistence) and waits until it answers.
    ///
    /// Panics with a clear message when `redis-server` is not installed: the
    /// storage suite must run against the real server, not skip.
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    /// As [`Self::start`], on a given port of 127.0.0.1.
    pub fn start_on(port: u16) -> Self {
        Self::spawn(port, None)
    }

    /// As [`Self::start_on`], with an append-only file in `dir` fsynced every
    /// write, so a restart on the same port and `dir` keeps everything
    /// acknowledged.
    pub fn start_durable_on(port: u16, dir: &std::path::Path) -> Self {
        Self::spawn(port, Some(dir))
    }

    fn spawn(port: u16, dir: Option<&std::path::Path>) -> Self {
        let port_arg = port.to_string();
        let mut args = vec!["--port", &port_arg, "--bind", "127.0.0.1", "--save", ""];
        let dir_arg = dir.map(|d| d.display().to_string());
        match &dir_arg {
            Some(d) => args.extend(["--appendonly", "yes", "--appendfsync", "always", "--dir", d]),
            None => args.extend(["--appendonly", "no"]),
        }
        args.extend(["--loglevel", "warning"]);
        let child = Command::new("redis-server")
            .args(&args)
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server ({e}): install it with `apt-get install -y redis-server` (make test does)")
            });
        let server = Self {
            child,
            port,
            _dir: None,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return server;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not start on port {port}");
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
