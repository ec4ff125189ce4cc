//! A message on its way to connections, encoded at most once per format and
//! shared by every connection that receives it.

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use pushcluster_core::frame::{encode_json, encode_resp_bulk, Format};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// A stored message on its way to connections, encoded lazily per format.
#[derive(Debug)]
pub struct Delivery {
    pub mid: i64,
    pub gid: i32,
    /// When the comet had it: stored by it, or arrived from the store.
    pub at: Instant,
    payload: Bytes,
    json: [OnceLock<Utf8Bytes>; 2],
    resp: [OnceLock<Bytes>; 2],
}

fn idx(f: Format) -> usize {
    match f {
        Format::Legacy => 0,
        Format::Json => 1,
    }
}

impl Delivery {
    /// A message with its mid and gid.
    pub fn new(mid: i64, gid: i32, payload: Bytes) -> Arc<Self> {
        Arc::new(Self {
            mid,
            gid,
            at: Instant::now(),
            payload,
            json: Default::default(),
            resp: Default::default(),
        })
    }
    /// The `{"msg":…,"mid":…,"gid":…}` frame in `format` (WebSocket, SSE).
    pub fn json(&self, format: Format) -> &Utf8Bytes {
        self.json[idx(format)].get_or_init(|| {
            let json = encode_json(&self.payload, self.mid, self.gid, format);
            // Stored payloads were checked to be UTF-8 JSON when pushed; a lossy
            // conversion keeps a corrupt record from taking the comet down.
            String::from_utf8(json)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
                .into()
        })
    }
    /// The same as a RESP bulk string (TCP).
    pub fn resp(&self, format: Format) -> &Bytes {
        self.resp[idx(format)]
            .get_or_init(|| encode_resp_bulk(self.json(format).as_str().as_bytes()).into())
    }
}
