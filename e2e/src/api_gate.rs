//! A TCP relay in front of the API server that can cut chosen pods off it:
//! a network partition between one pod and the control plane, which the
//! process harness cannot make otherwise (every pod shares one network
//! namespace, so the kernel cannot tell their connections apart by
//! address).
//!
//! Pods are pointed at the gate through their container environment
//! (`KUBERNETES_SERVICE_PORT`, which in-cluster clients read). The gate
//! relays bytes (TLS passes through untouched) and tells whose connection
//! each is by asking the kernel which process owns the other end
//! (`/proc/net/tcp`, then `/proc/<pid>/fd`), and that process's pod by its
//! `HOSTNAME`, which the kubelet sets to the pod name. A cut pod's
//! connections go silent both ways, as behind a dropped route: its requests
//! hang until its own deadlines give up, and the new connections it opens
//! are accepted and never answered. Lifting the cut closes those
//! connections, so the pod reconnects through the gate afresh.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The relay; stops when dropped.
pub struct ApiGate {
    /// Where pods connect (`127.0.0.1:<port>`).
    pub addr: SocketAddr,
    cut: watch::Sender<HashSet<String>>,
    seen: Arc<Mutex<HashSet<String>>>,
    cancel: CancellationToken,
}

impl ApiGate {
    /// Starts relaying to the API server at `upstream`.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (cut, _) = watch::channel(HashSet::new());
        let cancel = CancellationToken::new();
        let seen: Arc<Mutex<HashSet<String>>> = Arc::default();
        let accept = {
            let (cut, cancel, seen) = (cut.clone(), cancel.clone(), seen.clone());
            async move {
                loop {
                    let (conn, peer) = tokio::select! {
                        _ = cancel.cancelled() => return,
                        r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                    };
                    let cuts = cut.subscribe();
                    let (cancel, seen) = (cancel.clone(), seen.clone());
                    tokio::spawn(async move {
                        let pod = tokio::task::spawn_blocking(move || pod_of_peer(peer, addr))
                            .await
                            .ok()
                            .flatten()
                            .unwrap_or_default();
                        seen.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(pod.clone());
                        relay(conn, upstream, pod, cuts, cancel).await;
                    });
                }
            }
        };
        tokio::spawn(accept);
        Ok(Self {
            addr,
            cut,
            seen,
            cancel,
        })
    }

    /// Whether `pod` has connected through the gate.
    pub fn has_seen(&self, pod: &str) -> bool {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(pod)
    }

    /// Cuts `pod` off the API server until [`ApiGate::restore`].
    pub fn cut(&self, pod: &str) {
        self.cut.send_modify(|c| {
            c.insert(pod.to_owned());
        });
    }

    /// Lets `pod` reach the API server again.
    pub fn restore(&self, pod: &str) {
        self.cut.send_modify(|c| {
            c.remove(pod);
        });
    }
}

impl Drop for ApiGate {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Relays one connection of `pod` while it is not cut; while it is, holds
/// the connection open and silent; once the cut is lifted, closes it.
async fn relay(
    mut conn: TcpStream,
    upstream: SocketAddr,
    pod: String,
    mut cuts: watch::Receiver<HashSet<String>>,
    cancel: CancellationToken,
) {
    let is_cut = |c: &HashSet<String>| !pod.is_empty() && c.contains(&pod);
    if !is_cut(&cuts.borrow_and_update()) {
        let Ok(mut up) = TcpStream::connect(upstream).await else {
            return;
        };
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut conn, &mut up) => return,
            _ = cancel.cancelled() => return,
            _ = cuts.wait_for(is_cut) => {}
        }
        // Cut mid-connection: the API server side goes; the pod's side
        // stays open and hears nothing more.
        drop(up);
    }
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = cuts.wait_for(|c| !is_cut(c)) => {}
    }
    let _ = conn.shutdown().await;
}

/// The pod name of the process at the other end of a connection from
/// `peer` to `local`, or `None` when it cannot be told (not on this
/// machine, or the process is gone).
fn pod_of_peer(peer: SocketAddr, local: SocketAddr) -> Option<String> {
    let inode = socket_inode(peer, local)?;
    let target = format!("socket:[{inode}]");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        let owns = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str())
        });
        if owns {
            let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
            return env
                .split(|b| *b == 0)
                .find_map(|kv| kv.strip_prefix(b"HOSTNAME="))
                .map(|h| String::from_utf8_lossy(h).into_owned());
        }
    }
    None
}

/// The inode of the socket whose local end is `peer` and remote end
/// `local`, from `/proc/net/tcp` (IPv4).
fn socket_inode(peer: SocketAddr, local: SocketAddr) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let (want_local, want_remote) = (proc_addr(peer)?, proc_addr(local)?);
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() > 9 && f[1] == want_local && f[2] == want_remote)
            .then(|| f[9].parse().ok())
            .flatten()
    })
}

/// An IPv4 socket address as `/proc/net/tcp` writes it: the address's bytes
/// as one little-endian hex word, then the port, both upper case.
fn proc_addr(a: SocketAddr) -> Option<String> {
    let SocketAddr::V4(v4) = a else {
        return None;
    };
    let ip = u32::from_le_bytes(v4.ip().octets());
    Some(format!("{ip:08X}:{:04X}", v4.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_addresses_as_the_kernel_does() {
        let a: SocketAddr = "127.0.0.1:6443".parse().unwrap();
        assert_eq!(proc_addr(a).unwrap(), "0100007F:192B");
    }

    #[tokio::test]
    async fn tells_the_process_at_the_other_end() {
        // This test process is both ends: its HOSTNAME is what comes back.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local = listener.local_addr().unwrap();
        let _client = TcpStream::connect(local).await.unwrap();
        let (_conn, peer) = listener.accept().await.unwrap();
        let host = std::env::var("HOSTNAME").ok();
        let found = tokio::task::spawn_blocking(move || pod_of_peer(peer, local))
            .await
            .unwrap();
        assert!(socket_inode(peer, local).is_some());
        assert_eq!(found, host);
    }
}
