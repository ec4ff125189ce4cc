//! `pushctl`: push, subscribe, resolve and inspect a pushcluster.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use pushcluster_client::backoff::Backoff;
use pushcluster_client::http::{Client, Position, Proto};
use pushcluster_client::sub::{Params, Subscriber};
use pushcluster_client::{Error, Frame, Message};
use std::io::Write;
use std::time::Duration;

/// pushctl: the command-line tool for a pushcluster.
///
/// Talks to web's public listener (resolve, offline messages) and admin
/// listener (push, broadcast, delete), and subscribes to comets like any client.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    /// Base URL of web's public listener.
    #[arg(
        long,
        env = "PUSH_WEB",
        default_value = "http://127.0.0.1:8090",
        global = true
    )]
    web: String,
    /// Base URL of web's admin listener.
    #[arg(
        long,
        env = "PUSH_ADMIN",
        default_value = "http://127.0.0.1:8091",
        global = true
    )]
    admin: String,
    /// Admin bearer token, when the cluster requires one.
    #[arg(long, env = "PUSH_ADMIN_TOKEN", global = true, hide_env_values = true)]
    admin_token: Option<String>,
    /// The cluster's subscriber secret, when it checks subscriber tokens:
    /// pushctl then mints each key's token for private reads and `sub`.
    #[arg(
        long,
        env = "PUSH_SUBSCRIBER_SECRET",
        global = true,
        hide_env_values = true
    )]
    subscriber_secret: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Push a JSON message to one key; prints its mid once stored.
    Push {
        key: String,
        /// The message, any JSON value, e.g. '{"hi":1}'.
        json: String,
        /// Seconds until it expires (server default when omitted).
        #[arg(long)]
        expire: Option<u64>,
        /// Names this push (sent as the Idempotency-Key header): running the
        /// same command again within the cluster's dedupe window (default
        /// 60 s) prints the first mid and stores nothing new.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Push one JSON message to several keys (comma-separated); prints failed keys.
    Mpush {
        keys: String,
        json: String,
        #[arg(long)]
        expire: Option<u64>,
    },
    /// Send a public message to every connection; prints its public mid.
    Broadcast {
        json: String,
        #[arg(long)]
        expire: Option<u64>,
    },
    /// Delete a key's stored messages.
    Del { key: String },
    /// Subscribe to a key and print every message as a JSON line, in mid order.
    ///
    /// Resolves the key's comet, subscribes, then fetches what was stored after
    /// --from, dropping duplicates by mid; fills gaps from storage; reconnects
    /// (resolving again) when the comet closes or asks it to.
    Sub {
        key: String,
        /// Transport to the comet.
        #[arg(long, value_enum, default_value_t = Transport::Ws)]
        proto: Transport,
        /// Print messages after this mid (0: everything still stored).
        #[arg(long, default_value_t = 0)]
        from: i64,
        /// Heartbeat interval in seconds.
        #[arg(long, default_value_t = 30)]
        heartbeat: u64,
        /// Subscriber token, when the cluster checks them (minted from
        /// --subscriber-secret when that is given instead).
        #[arg(long)]
        token: Option<String>,
        /// Exit after this many messages.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Print the comet address serving a key.
    Resolve {
        key: String,
        #[arg(long, value_enum, default_value_t = Transport::Ws)]
        proto: Transport,
    },
    /// Check that web answers; with --key, show the key's comet and last mids.
    Status {
        #[arg(long)]
        key: Option<String>,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Transport {
    Ws,
    Tcp,
    Sse,
}

impl From<Transport> for Proto {
    fn from(t: Transport) -> Self {
        match t {
            Transport::Ws => Proto::WebSocket,
            Transport::Tcp => Proto::Tcp,
            Transport::Sse => Proto::Sse,
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let client = Client::new(&cli.web, &cli.admin, cli.admin_token.clone())
        .with_subscriber_secret(cli.subscriber_secret.clone());
    match cli.cmd {
        Cmd::Push {
            key,
            json,
            expire,
            idempotency_key,
        } => {
            check_json(&json)?;
            let mid = client
                .push_idempotent(&key, &json, expire, idempotency_key.as_deref())
                .await?;
            println!("{mid}");
        }
        Cmd::Mpush { keys, json, expire } => {
            check_json(&json)?;
            let list: Vec<&str> = keys.split(',').collect();
            let failed = client.mpush(&list, &json, expire).await?;
            if !failed.is_empty() {
                bail!("failed keys: {}", failed.join(","));
            }
            println!("ok");
        }
        Cmd::Broadcast { json, expire } => {
            check_json(&json)?;
            println!("{}", client.broadcast(&json, expire).await?);
        }
        Cmd::Del { key } => {
            client.delete(&key).await?;
            println!("ok");
        }
        Cmd::Resolve { key, proto } => println!("{}", client.resolve(&key, proto.into()).await?),
        Cmd::Status { key } => {
            client.time().await.context("web public listener")?;
            println!("web {}: ok", cli.web);
            if let Some(k) = key {
                let (mid, _) = client.last_mids(&k).await?;
                let comet = client.resolve(&k, Proto::WebSocket).await;
                match comet {
                    Ok(c) => println!("key {k}: comet {c}, last mid {mid}"),
                    Err(e) => println!("key {k}: no comet ({e}), last mid {mid}"),
                }
            }
        }
        Cmd::Sub {
            key,
            proto,
            from,
            heartbeat,
            token,
            count,
        } => {
            let token = token.or_else(|| {
                cli.subscriber_secret
                    .as_ref()
                    .map(|s| pushcluster_core::token::mint_for(s.as_bytes(), &key, 24 * 3600))
            });
            let p = Params {
                key,
                heartbeat: heartbeat.max(1),
                token,
                versioned: true,
            };
            subscribe(&client, p, proto, from, count).await?;
        }
    }
    Ok(())
}

fn check_json(s: &str) -> anyhow::Result<()> {
    serde_json::from_str::<serde_json::Value>(s).context("the message must be JSON")?;
    Ok(())
}

/// Prints messages in mid order, exactly once, across reconnects.
struct Printer {
    last: i64,
    last_public: Option<i64>,
    /// The epochs `last` and `last_public` belong to (0: none learnt yet).
    epoch: u64,
    public_epoch: u64,
    printed: u64,
    limit: Option<u64>,
}

impl Printer {
    fn print(&mut self, m: &Message) -> bool {
        let fresh = match m.gid {
            0 if m.mid > self.last => {
                self.last = m.mid;
                true
            }
            1 if self.last_public.is_none_or(|p| m.mid > p) => {
                self.last_public = Some(m.mid);
                true
            }
            _ => false,
        };
        if fresh {
            let line = serde_json::json!({"mid": m.mid, "gid": m.gid, "msg": m.msg});
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
            self.printed += 1;
        }
        self.limit.is_some_and(|l| self.printed >= l)
    }
}

async fn catch_up(
    client: &Client,
    key: &str,
    token: Option<&str>,
    pr: &mut Printer,
) -> anyhow::Result<bool> {
    loop {
        let at = Position {
            after: pr.last,
            epoch: Some(pr.epoch),
            public_after: pr.last_public,
            public_epoch: pr.last_public.map(|_| pr.public_epoch),
        };
        let page = client.fetch_page_with_token(key, token, at).await?;
        pr.epoch = page.epoch.unwrap_or(pr.epoch);
        pr.public_epoch = page.pepoch.unwrap_or(pr.public_epoch);
        // The key's sequence started again (storage lost its data): what
        // comes is new although its mids are not higher.
        if page.reset {
            eprintln!("the key's message ids started again (storage lost data)");
            pr.last = 0;
        }
        if page.preset {
            pr.last_public = Some(0);
        }
        let (msgs, pmsgs) = (page.msgs, page.pmsgs);
        let more = !msgs.is_empty();
        for m in msgs.iter().chain(pmsgs.iter()) {
            if pr.print(m) {
                return Ok(true);
            }
        }
        if !more {
            return Ok(false);
        }
    }
}

async fn subscribe(
    client: &Client,
    p: Params,
    proto: Transport,
    from: i64,
    limit: Option<u64>,
) -> anyhow::Result<()> {
    let (_, pmid) = client
        .last_mids_with_token(&p.key, p.token.as_deref())
        .await?;
    let mut pr = Printer {
        last: from,
        last_public: Some(pmid),
        epoch: 0,
        public_epoch: 0,
        printed: 0,
        limit,
    };
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let addr = client.resolve(&p.key, proto.into()).await;
        let sub = match &addr {
            Ok(a) => match proto {
                Transport::Ws => Subscriber::websocket(a, &p).await,
                Transport::Tcp => Subscriber::tcp(a, &p).await,
                Transport::Sse => Subscriber::sse_from(a, &p, Some(pr.last), Some(pr.epoch)).await,
            },
            Err(e) => Err(Error::Frame(e.to_string())),
        };
        let mut sub = match sub {
            Ok(s) => s,
            Err(e) => {
                let pause = backoff.next_pause();
                eprintln!("connect failed ({e}); retrying in {pause:?}");
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        // Subscribed first, fetched second: nothing falls in between.
        if !matches!(proto, Transport::Sse) {
            match sub.next_timeout(Duration::from_secs(10)).await {
                Ok(Frame::Heartbeat) => {}
                // -c: this comet does not take the key now (it moved during a
                // failover, or the per-key limit): resolve again and retry.
                Ok(Frame::Error(e)) if e == "-c" => {
                    let pause = backoff.next_pause();
                    eprintln!("comet refused the key for now (-c); retrying in {pause:?}");
                    tokio::time::sleep(pause).await;
                    continue;
                }
                Ok(Frame::Error(e)) => {
                    bail!("comet refused the subscription: {e} (-p parameter, -a token)")
                }
                Ok(other) => bail!("unexpected first frame {other:?}"),
                Err(e) => {
                    let pause = backoff.next_pause();
                    eprintln!("subscribe failed ({e}); retrying in {pause:?}");
                    tokio::time::sleep(pause).await;
                    continue;
                }
            }
        }
        if catch_up(client, &p.key, p.token.as_deref(), &mut pr).await? {
            return Ok(());
        }
        backoff.reset();
        let mut beat = tokio::time::interval(Duration::from_secs(p.heartbeat));
        beat.tick().await;
        loop {
            tokio::select! {
                _ = beat.tick() => {
                    if sub.heartbeat().await.is_err() {
                        break;
                    }
                }
                f = sub.next() => match f {
                    Ok(Frame::Message(m)) => {
                        // A gap means messages were stored that this connection
                        // did not get: fill it from storage first.
                        if m.gid == 0 && m.mid > pr.last + 1 && catch_up(client, &p.key, p.token.as_deref(), &mut pr).await? {
                            return Ok(());
                        }
                        if pr.print(&m) {
                            return Ok(());
                        }
                        // A sequence began while connected: learn its epoch,
                        // which the next fetch carries to tell a restart.
                        if m.gid == 0 && m.mid == 1 && pr.epoch == 0 && catch_up(client, &p.key, p.token.as_deref(), &mut pr).await? {
                            return Ok(());
                        }
                    }
                    Ok(Frame::Heartbeat) => {}
                    Ok(Frame::Reset) => {
                        eprintln!("the key's message ids started again (storage lost data)");
                        pr.last = 0;
                    }
                    Ok(Frame::Epoch(e)) => pr.epoch = e,
                    Ok(Frame::Reconnect) => {
                        eprintln!("comet asked to reconnect");
                        break;
                    }
                    Ok(Frame::Error(e)) => bail!("comet error {e}"),
                    Err(e) => {
                        eprintln!("connection lost ({e}); reconnecting");
                        break;
                    }
                }
            }
        }
    }
}
