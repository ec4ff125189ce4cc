//! The Sentinels' announcements of a failover, heard on their pub/sub.

use super::Group;
use crate::CONNECT_TIMEOUT;
use futures::StreamExt;
use redis::RedisResult;
use std::time::Duration;
use tokio::sync::mpsc;

/// The pub/sub channel on which a Sentinel announces a failover's end:
/// `<master-name> <old-ip> <old-port> <new-ip> <new-port>`.
const SWITCH_MASTER: &str = "+switch-master";

/// The channel on which the failover's leader announces that the replica
/// it chose answers as a master:
/// `slave <ip:port> <ip> <port> @ <master-name> <old-ip> <old-port>`.
const PROMOTED: &str = "+promoted-slave";

/// The channel on which the failover's leader names the replica it chose,
/// just before it tells it `REPLICAOF NO ONE` (same form as [`PROMOTED`]).
/// The leader sees the promotion only at its next `INFO` of the replica,
/// up to a second later; a master that is still up (one the Sentinels
/// wrongly took for down, under load) takes writes all that second that
/// the replica, no longer replicating, never gets. So the writers leave it
/// at the selection and wait for the replica to answer as a master.
const SELECTED: &str = "+selected-slave";

/// Pause before listening to a Sentinel again after its connection failed,
/// doubled up to the maximum.
const LISTEN_RETRY: Duration = Duration::from_millis(200);
const LISTEN_RETRY_MAX: Duration = Duration::from_secs(5);

/// `ip` and `port` as one address (an IPv6 host in brackets), if the port
/// is one.
fn address_of(ip: &str, port: &str) -> Option<String> {
    port.parse::<u16>().ok()?;
    if ip.contains(':') {
        Some(format!("[{ip}]:{port}"))
    } else {
        Some(format!("{ip}:{port}"))
    }
}

/// The new master's address in a `+switch-master` announcement, when it
/// is about `master`.
fn switched_to(master: &str, announcement: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(announcement).ok()?;
    match text.split_ascii_whitespace().collect::<Vec<_>>()[..] {
        [name, _, _, ip, port] if name == master => address_of(ip, port),
        _ => None,
    }
}

/// The replica's address in a `+selected-slave` or `+promoted-slave`
/// announcement, when it is one of `master`'s.
fn replica_named(master: &str, announcement: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(announcement).ok()?;
    match text.split_ascii_whitespace().collect::<Vec<_>>()[..] {
        ["slave", _, ip, port, "@", name, _, _] if name == master => address_of(ip, port),
        _ => None,
    }
}

/// The new master a Sentinel's message on `channel` announces, if any.
fn announced(master: &str, channel: &str, payload: &[u8]) -> Option<String> {
    match channel {
        SWITCH_MASTER => switched_to(master, payload),
        PROMOTED | SELECTED => replica_named(master, payload),
        _ => None,
    }
}

/// Listens to one Sentinel's announcements until `tx` is closed.
pub(super) async fn listen(sentinel: String, group: Group, tx: mpsc::UnboundedSender<String>) {
    let mut pause = LISTEN_RETRY;
    loop {
        let heard = tokio::select! {
            () = tx.closed() => return,
            r = listen_once(&sentinel, &group, &tx) => r,
        };
        match heard {
            Ok(()) => pause = LISTEN_RETRY,
            Err(e) => {
                tracing::debug!(sentinel, error = %e, "cannot listen to a sentinel's failovers");
            }
        }
        tokio::select! {
            () = tx.closed() => return,
            () = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(LISTEN_RETRY_MAX);
    }
}

/// One connection's worth of a Sentinel's announcements: Ok once it was
/// subscribed and then closed.
async fn listen_once(
    sentinel: &str,
    group: &Group,
    tx: &mpsc::UnboundedSender<String>,
) -> RedisResult<()> {
    let client = group.tls.client_of_addr(sentinel)?;
    let mut pubsub = tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub())
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    pubsub
        .subscribe(&[SWITCH_MASTER, SELECTED, PROMOTED])
        .await?;
    let mut messages = pubsub.on_message();
    while let Some(m) = messages.next().await {
        if let Some(to) = announced(&group.master, m.get_channel_name(), m.get_payload_bytes()) {
            group.heard(&to);
            if tx.send(to).is_err() {
                break;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_switch_announcement_names_the_new_master_of_its_group() {
        let a = b"pcmaster 127.0.0.1 6379 127.0.0.1 6380";
        assert_eq!(
            switched_to("pcmaster", a).as_deref(),
            Some("127.0.0.1:6380")
        );
        assert_eq!(switched_to("other", a), None, "another group's failover");
        assert_eq!(
            switched_to("m", b"m ::1 6379 ::1 6380").as_deref(),
            Some("[::1]:6380")
        );
        assert_eq!(switched_to("m", b"m 10.0.0.1 6379 10.0.0.2"), None);
        assert_eq!(switched_to("m", b"m a 1 b port"), None);
        assert_eq!(switched_to("m", &[0xff, 0xfe]), None);
    }

    #[test]
    fn a_promotion_names_the_replica_that_is_now_master() {
        let a = b"slave 127.0.0.1:6380 127.0.0.1 6380 @ pcmaster 127.0.0.1 6379";
        assert_eq!(
            replica_named("pcmaster", a).as_deref(),
            Some("127.0.0.1:6380")
        );
        assert_eq!(replica_named("other", a), None, "another group's replica");
        assert_eq!(
            announced("pcmaster", PROMOTED, a).as_deref(),
            Some("127.0.0.1:6380")
        );
        assert_eq!(
            announced("pcmaster", SELECTED, a).as_deref(),
            Some("127.0.0.1:6380")
        );
        assert_eq!(announced("pcmaster", SWITCH_MASTER, a), None);
        assert_eq!(announced("pcmaster", "+sdown", a), None);
        assert_eq!(
            replica_named("m", b"slave [::1]:6380 ::1 6380 @ m ::1 6379").as_deref(),
            Some("[::1]:6380")
        );
        assert_eq!(replica_named("m", b"master m 127.0.0.1 6379"), None);
        assert_eq!(replica_named("m", b"slave x 127.0.0.1 port @ m h 1"), None);
    }
}
