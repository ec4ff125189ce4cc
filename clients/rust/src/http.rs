//! The web HTTP API.

use crate::{parse_message, Error, Message, Result};
use serde_json::Value;

/// Client of a cluster's web listeners.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    public: String,
    admin: String,
    admin_token: Option<String>,
    /// Mints each key's subscriber token for private reads (trusted tools).
    subscriber_secret: Option<String>,
}

/// How long a token minted for one read stays valid.
const READ_TOKEN_SECONDS: u64 = 300;

/// Protocol asked of `/1/server/get`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    WebSocket = 1,
    Tcp = 2,
    Sse = 3,
}

/// One page of stored messages.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fetched {
    /// Private messages after the mid asked for.
    pub msgs: Vec<Message>,
    /// Public messages, when asked for.
    pub pmsgs: Vec<Message>,
    /// The key's sequence started again (storage lost its data): `msgs`
    /// are from its start; forget the mids seen so far.
    pub reset: bool,
    /// The same for the public channel.
    pub preset: bool,
    /// The epoch the private mids belong to, when asked for (see
    /// [`Position::epoch`]).
    pub epoch: Option<u64>,
    /// The same for the public channel.
    pub pepoch: Option<u64>,
}

/// Where a reader stands: what `/1/msg/get` reads after.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Position {
    /// The last private mid seen.
    pub after: i64,
    /// The epoch `after` was seen under (0 when none was seen yet); `None`
    /// reads as gopush-cluster's clients do, without epochs. With one, the
    /// reply always says the key's epoch, and a sequence that started
    /// again since is told as `reset` even once its new mids passed `after`.
    pub epoch: Option<u64>,
    /// The last public mid seen, when public messages are wanted.
    pub public_after: Option<i64>,
    /// The epoch `public_after` was seen under.
    pub public_epoch: Option<u64>,
}

impl Client {
    /// `public` and `admin` are base URLs such as `http://127.0.0.1:8090`.
    pub fn new(public: &str, admin: &str, admin_token: Option<String>) -> Self {
        Self {
            http: reqwest::Client::new(),
            public: public.trim_end_matches('/').to_owned(),
            admin: admin.trim_end_matches('/').to_owned(),
            admin_token,
            subscriber_secret: None,
        }
    }

    /// Private reads carry a token minted from `secret` for their key: for
    /// back ends and tools that hold the cluster's subscriber secret. End
    /// clients pass the token they were given ([`Client::fetch_with_token`]).
    pub fn with_subscriber_secret(mut self, secret: Option<String>) -> Self {
        self.subscriber_secret = secret.filter(|s| !s.is_empty());
        self
    }

    pub(crate) fn minted(&self, key: &str) -> Option<String> {
        self.subscriber_secret
            .as_ref()
            .map(|s| pushcluster_core::token::mint_for(s.as_bytes(), key, READ_TOKEN_SECONDS))
    }

    async fn call(&self, req: reqwest::RequestBuilder) -> Result<Option<Value>> {
        let req = match &self.admin_token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let v: Value = req.send().await?.json().await?;
        let ret = v.get("ret").and_then(Value::as_i64).unwrap_or(-1);
        if ret != 0 {
            return Err(Error::Api {
                ret,
                msg: v
                    .get("msg")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
            });
        }
        Ok(v.get("data").cloned())
    }

    /// The address of the comet serving `key` for `proto`.
    pub async fn resolve(&self, key: &str, proto: Proto) -> Result<String> {
        self.resolve_inner(key, proto, None).await
    }

    /// [`Client::resolve`] after losing the comet at `lost` (the connection
    /// broke, or nothing answered there): web answers once the key's shard
    /// has another holder, or after about a lease duration if none comes.
    pub async fn resolve_after_losing(
        &self,
        key: &str,
        proto: Proto,
        lost: &str,
    ) -> Result<String> {
        self.resolve_inner(key, proto, Some(lost)).await
    }

    async fn resolve_inner(&self, key: &str, proto: Proto, lost: Option<&str>) -> Result<String> {
        let url = format!("{}/1/server/get", self.public);
        let p = (proto as u8).to_string();
        let mut query = vec![("k", key), ("p", &p)];
        if let Some(lost) = lost {
            query.push(("w", lost));
        }
        let data = self.call(self.http.get(url).query(&query)).await?;
        data.and_then(|d| d.get("server").and_then(Value::as_str).map(str::to_owned))
            .ok_or_else(|| Error::Frame("no server in reply".into()))
    }

    /// Private messages after `after` and, when `public_after` is given, public
    /// messages after it.
    pub async fn fetch(
        &self,
        key: &str,
        after: i64,
        public_after: Option<i64>,
    ) -> Result<(Vec<Message>, Vec<Message>)> {
        let token = self.minted(key);
        self.fetch_with_token(key, token.as_deref(), after, public_after)
            .await
    }

    /// [`Client::fetch`] with the key's subscriber token (when the cluster
    /// checks them).
    pub async fn fetch_with_token(
        &self,
        key: &str,
        token: Option<&str>,
        after: i64,
        public_after: Option<i64>,
    ) -> Result<(Vec<Message>, Vec<Message>)> {
        let at = Position {
            after,
            public_after,
            ..Position::default()
        };
        let f = self.fetch_page_with_token(key, token, at).await?;
        Ok((f.msgs, f.pmsgs))
    }

    /// One page of `/1/msg/get` from `at`, with whether a sequence started
    /// again.
    pub async fn fetch_page_with_token(
        &self,
        key: &str,
        token: Option<&str>,
        at: Position,
    ) -> Result<Fetched> {
        let url = format!("{}/1/msg/get", self.public);
        let mut q = vec![("k", key.to_owned()), ("m", at.after.to_string())];
        if let Some(p) = at.public_after {
            q.push(("p", p.to_string()));
        }
        if let Some(e) = at.epoch {
            q.push(("e", e.to_string()));
        }
        if let Some(e) = at.public_epoch {
            q.push(("pe", e.to_string()));
        }
        if let Some(t) = token {
            q.push(("token", t.to_owned()));
        }
        let Some(data) = self.call(self.http.get(url).query(&q)).await? else {
            return Ok(Fetched::default());
        };
        let list = |name: &str| -> Result<Vec<Message>> {
            data.get(name)
                .and_then(Value::as_array)
                .map(|a| a.iter().map(parse_message).collect())
                .unwrap_or(Ok(Vec::new()))
        };
        let flag = |name: &str| data.get(name).and_then(Value::as_bool).unwrap_or(false);
        Ok(Fetched {
            msgs: list("msgs")?,
            pmsgs: list("pmsgs")?,
            reset: flag("reset"),
            preset: flag("preset"),
            epoch: data.get("epoch").and_then(Value::as_u64),
            pepoch: data.get("pepoch").and_then(Value::as_u64),
        })
    }

    /// Web's time (`data.timeid`, 100 ns units): answers without credentials.
    pub async fn time(&self) -> Result<i64> {
        let url = format!("{}/1/time/get", self.public);
        let d = self.call(self.http.get(url)).await?.unwrap_or_default();
        Ok(d.get("timeid").and_then(Value::as_i64).unwrap_or(0))
    }

    /// The key's last mid and the last public mid.
    pub async fn last_mids(&self, key: &str) -> Result<(i64, i64)> {
        let token = self.minted(key);
        self.last_mids_with_token(key, token.as_deref()).await
    }

    /// [`Client::last_mids`] with the key's subscriber token.
    pub async fn last_mids_with_token(&self, key: &str, token: Option<&str>) -> Result<(i64, i64)> {
        let url = format!("{}/1/time/get", self.public);
        let mut q = vec![("k", key.to_owned())];
        if let Some(t) = token {
            q.push(("token", t.to_owned()));
        }
        let d = self
            .call(self.http.get(url).query(&q))
            .await?
            .unwrap_or_default();
        let get = |n: &str| d.get(n).and_then(Value::as_i64).unwrap_or(0);
        Ok((get("mid"), get("pmid")))
    }

    fn expire_query(expire: Option<u64>) -> Vec<(&'static str, String)> {
        expire
            .map(|e| vec![("expire", e.to_string())])
            .unwrap_or_default()
    }

    /// Pushes `json` to `key`; returns its mid once stored.
    pub async fn push(&self, key: &str, json: &str, expire: Option<u64>) -> Result<i64> {
        self.push_idempotent(key, json, expire, None).await
    }

    /// [`Client::push`] named by `idempotency_key` (an `Idempotency-Key`
    /// header): repeating it with the same key and message within the
    /// cluster's dedupe window stores nothing new and returns the first mid,
    /// so a push whose answer was lost can be sent again safely.
    pub async fn push_idempotent(
        &self,
        key: &str,
        json: &str,
        expire: Option<u64>,
        idempotency_key: Option<&str>,
    ) -> Result<i64> {
        let url = format!("{}/1/admin/push/private", self.admin);
        let mut q = Self::expire_query(expire);
        q.push(("key", key.to_owned()));
        let mut req = self.http.post(url).query(&q).body(json.to_owned());
        if let Some(k) = idempotency_key {
            req = req.header("Idempotency-Key", k);
        }
        let d = self.call(req).await?;
        d.and_then(|d| d.get("mid").and_then(Value::as_i64))
            .ok_or_else(|| Error::Frame("no mid in reply".into()))
    }

    /// Pushes `json` to every key; returns the keys that failed.
    pub async fn mpush(
        &self,
        keys: &[&str],
        json: &str,
        expire: Option<u64>,
    ) -> Result<Vec<String>> {
        let url = format!("{}/1/admin/push/mprivate", self.admin);
        let body = serde_json::json!({"m": json, "k": keys.join(",")});
        let d = self
            .call(
                self.http
                    .post(url)
                    .query(&Self::expire_query(expire))
                    .json(&body),
            )
            .await?;
        Ok(d.and_then(|d| {
            d.get("fk").and_then(Value::as_array).map(|a| {
                a.iter()
                    .filter_map(|k| k.as_str().map(str::to_owned))
                    .collect()
            })
        })
        .unwrap_or_default())
    }

    /// Broadcasts `json` to every connection; returns its public mid.
    pub async fn broadcast(&self, json: &str, expire: Option<u64>) -> Result<i64> {
        let url = format!("{}/1/admin/push/broadcast", self.admin);
        let d = self
            .call(
                self.http
                    .post(url)
                    .query(&Self::expire_query(expire))
                    .body(json.to_owned()),
            )
            .await?;
        d.and_then(|d| d.get("mid").and_then(Value::as_i64))
            .ok_or_else(|| Error::Frame("no mid in reply".into()))
    }

    /// Deletes the key's stored messages.
    pub async fn delete(&self, key: &str) -> Result<()> {
        let url = format!("{}/1/admin/msg/del", self.admin);
        self.call(self.http.post(url).query(&[("key", key)]))
            .await
            .map(|_| ())
    }
}
