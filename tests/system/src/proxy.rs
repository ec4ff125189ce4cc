//! A TCP proxy a test can break in the two ways a network breaks: frozen, no
//! byte moves either way and no connection is closed (a partition or a lost
//! node: half-open connections, no FIN, no RST); cut, every connection is
//! closed and new ones are refused (a process gone, a port firewalled).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A proxy from a free port of 127.0.0.1 to `127.0.0.1:<target>`; stops on drop.
pub struct FreezableProxy {
    /// The port it listens on.
    pub port: u16,
    frozen: Arc<AtomicBool>,
    cut: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl FreezableProxy {
    /// Starts forwarding to `target` (needs a tokio runtime).
    pub async fn start(target: u16) -> Self {
        Self::start_now(target)
    }

    /// [`Self::start`] from synchronous code running inside a tokio runtime.
    pub fn start_now(target: u16) -> Self {
        let std_listener =
            std::net::TcpListener::bind(("127.0.0.1", crate::free_port())).expect("proxy listener");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let port = std_listener.local_addr().expect("proxy address").port();
        let listener = TcpListener::from_std(std_listener).expect("tokio listener");
        let frozen = Arc::new(AtomicBool::new(false));
        let (cut, cut_rx) = watch::channel(false);
        let f = frozen.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *cut_rx.borrow() {
                    continue;
                }
                let (f, cut_rx) = (f.clone(), cut_rx.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(
                        pump(cr, sw, f.clone(), cut_rx.clone()),
                        pump(sr, cw, f, cut_rx)
                    );
                });
            }
        });
        Self {
            port,
            frozen,
            cut,
            task,
        }
    }

    /// Its URL as a Redis URL.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Stops moving bytes (connections stay open).
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// Closes every connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Works again: moves bytes, takes connections.
    pub fn thaw(&self) {
        self.frozen.store(false, Ordering::SeqCst);
        self.cut.send_replace(false);
    }
}

impl Drop for FreezableProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to`, holding bytes (unread) while frozen, until either
/// end closes or the proxy is cut.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
    mut cut: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        while frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            _ = cut.wait_for(|c| *c) => break,
        };
        // Bytes read just as the freeze began are held until the thaw.
        while frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if *cut.borrow() || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
