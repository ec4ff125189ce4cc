//! Pure parsing of what subscribers send: the TCP `sub` command (a RESP array,
//! as in gopush-cluster) and subscribe parameters shared by every transport.

use pushcluster_core::frame::Format;

/// Most arguments accepted in one RESP command.
const MAX_ARGS: usize = 8;
/// Longest argument accepted, in bytes.
const MAX_ARG_BYTES: usize = 4096;

/// A malformed command; the connection gets `-p` and is closed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("expected '{0}'")]
    Prefix(char),
    #[error("bad number")]
    Number,
    #[error("too many arguments")]
    TooManyArgs,
    #[error("argument too long")]
    ArgTooLong,
    #[error("missing CRLF")]
    Crlf,
    #[error("argument is not UTF-8")]
    Utf8,
}

/// Parses one RESP array of bulk strings from the start of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed, else the arguments and how
/// many bytes they took.
pub fn parse_command(buf: &[u8]) -> Result<Option<(Vec<String>, usize)>, ProtoError> {
    let mut pos = 0;
    let Some(n) = parse_len(buf, &mut pos, b'*')? else {
        return Ok(None);
    };
    if n == 0 || n > MAX_ARGS {
        return Err(ProtoError::TooManyArgs);
    }
    let mut args = Vec::with_capacity(n);
    for _ in 0..n {
        let Some(len) = parse_len(buf, &mut pos, b'$')? else {
            return Ok(None);
        };
        if len > MAX_ARG_BYTES {
            return Err(ProtoError::ArgTooLong);
        }
        if buf.len() < pos + len + 2 {
            return Ok(None);
        }
        if &buf[pos + len..pos + len + 2] != b"\r\n" {
            return Err(ProtoError::Crlf);
        }
        let arg = std::str::from_utf8(&buf[pos..pos + len]).map_err(|_| ProtoError::Utf8)?;
        args.push(arg.to_owned());
        pos += len + 2;
    }
    Ok(Some((args, pos)))
}

/// Parses `<prefix><decimal>\r\n` at `pos`, advancing it.
fn parse_len(buf: &[u8], pos: &mut usize, prefix: u8) -> Result<Option<usize>, ProtoError> {
    let rest = &buf[*pos..];
    let Some(&first) = rest.first() else {
        return Ok(None);
    };
    if first != prefix {
        return Err(ProtoError::Prefix(prefix as char));
    }
    let Some(end) = rest.iter().position(|&b| b == b'\n') else {
        if rest.len() > 12 {
            return Err(ProtoError::Number);
        }
        return Ok(None);
    };
    if end < 2 || rest[end - 1] != b'\r' {
        return Err(ProtoError::Crlf);
    }
    let digits = std::str::from_utf8(&rest[1..end - 1]).map_err(|_| ProtoError::Number)?;
    let n: usize = digits.parse().map_err(|_| ProtoError::Number)?;
    *pos += end + 1;
    Ok(Some(n))
}

/// What an SSE subscription asks for (`GET /sub/sse?key=&token=&last_id=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseRequest {
    pub key: String,
    pub token: String,
    /// Resume after this mid (from `Last-Event-ID`, else `last_id=`).
    pub last: Option<i64>,
    /// `epoch=`: the epoch `last` was seen under (0: none yet). Given, the
    /// stream starts with the key's epoch (`event: epoch`).
    pub epoch: Option<u64>,
}

/// Why an SSE request is refused (HTTP 400, ret 65534).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    #[error("key is required")]
    NoKey,
    #[error("Last-Event-ID is not a mid")]
    BadLastId,
    #[error("epoch is not a non-negative integer")]
    BadEpoch,
}

/// Parses an SSE subscription from the raw query (form-urlencoded; a later
/// repeat of a name wins, as axum's Query does) and the `Last-Event-ID`
/// header, which wins over `last_id=`. A mid is a non-negative decimal
/// (surrounding spaces allowed); an empty one means "from now". Total over
/// arbitrary bytes: never panics, refuses with a reason.
pub fn parse_sse(query: &str, last_event_id: Option<&[u8]>) -> Result<SseRequest, SseError> {
    let (mut key, mut token, mut last_id, mut epoch) = (String::new(), String::new(), None, None);
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "key" => key = v.into_owned(),
            "token" => token = v.into_owned(),
            "last_id" => last_id = Some(v.into_owned()),
            "epoch" => epoch = Some(v.into_owned()),
            _ => {}
        }
    }
    let epoch = match epoch.as_deref().map(str::trim) {
        None => None,
        Some(v) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => {
            Some(v.parse::<u64>().map_err(|_| SseError::BadEpoch)?)
        }
        Some(_) => return Err(SseError::BadEpoch),
    };
    let last = match last_event_id {
        Some(h) => Some(
            std::str::from_utf8(h)
                .map_err(|_| SseError::BadLastId)?
                .to_owned(),
        ),
        None => last_id,
    };
    let last = match last.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(v) => match v.parse::<i64>() {
            Ok(n) if n >= 0 && v.bytes().all(|b| b.is_ascii_digit()) => Some(n),
            _ => return Err(SseError::BadLastId),
        },
    };
    if key.is_empty() {
        return Err(SseError::NoKey);
    }
    Ok(SseRequest {
        key,
        token,
        last,
        epoch,
    })
}

/// What a subscriber asked for, whatever the transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub key: String,
    /// Seconds between the client's heartbeats.
    pub heartbeat: u64,
    pub token: String,
    pub format: Format,
}

/// Bounds on the heartbeat a client may ask for.
#[derive(Debug, Clone, Copy)]
pub struct HeartbeatBounds {
    pub min: u64,
    pub max: u64,
}

/// Builds a [`Subscribe`] from raw parameters; any error means `-p`.
///
/// `ver` present and non-empty selects the JSON message format (gopush-cluster's
/// versioned clients); absent, the legacy format.
pub fn subscribe_params(
    key: Option<&str>,
    heartbeat: Option<&str>,
    token: Option<&str>,
    ver: Option<&str>,
    bounds: HeartbeatBounds,
) -> Option<Subscribe> {
    let key = key.filter(|k| !k.is_empty())?;
    let heartbeat: u64 = heartbeat?.trim().parse().ok()?;
    if heartbeat < bounds.min || heartbeat > bounds.max {
        return None;
    }
    let format = match ver {
        Some(v) if !v.is_empty() => Format::Json,
        _ => Format::Legacy,
    };
    Some(Subscribe {
        key: key.to_owned(),
        heartbeat,
        token: token.unwrap_or_default().to_owned(),
        format,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(args: &[&str]) -> Vec<u8> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
        }
        out
    }

    #[test]
    fn parses_a_full_command() {
        let buf = resp(&["sub", "alice", "30", "tok", "1"]);
        let (args, used) = parse_command(&buf).unwrap().unwrap();
        assert_eq!(args, vec!["sub", "alice", "30", "tok", "1"]);
        assert_eq!(used, buf.len());
    }

    #[test]
    fn every_prefix_needs_more_bytes() {
        let buf = resp(&["sub", "alice", "30"]);
        for cut in 0..buf.len() {
            assert_eq!(parse_command(&buf[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn leaves_following_bytes_alone() {
        let mut buf = resp(&["sub", "k", "5"]);
        let len = buf.len();
        buf.extend_from_slice(b"h");
        assert_eq!(parse_command(&buf).unwrap().unwrap().1, len);
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(
            parse_command(b"GET / HTTP/1.1\r\n"),
            Err(ProtoError::Prefix('*'))
        );
        assert_eq!(parse_command(b"*x\r\n"), Err(ProtoError::Number));
        assert_eq!(parse_command(b"*0\r\n"), Err(ProtoError::TooManyArgs));
        assert_eq!(parse_command(b"*99\r\n"), Err(ProtoError::TooManyArgs));
        assert_eq!(parse_command(b"*1\n"), Err(ProtoError::Crlf));
        assert_eq!(parse_command(b"*1\r\n$3\r\nsubXY"), Err(ProtoError::Crlf));
        assert_eq!(
            parse_command(b"*1\r\n$99999\r\n"),
            Err(ProtoError::ArgTooLong)
        );
        assert_eq!(
            parse_command(b"*1\r\n$2\r\n\xff\xfe\r\n"),
            Err(ProtoError::Utf8)
        );
        assert_eq!(
            parse_command(b"*1111111111111111111"),
            Err(ProtoError::Number)
        );
    }

    #[test]
    fn subscribe_parameters() {
        let b = HeartbeatBounds { min: 1, max: 600 };
        let s = subscribe_params(Some("a"), Some("30"), None, None, b).unwrap();
        assert_eq!((s.heartbeat, s.format), (30, Format::Legacy));
        let s = subscribe_params(Some("a"), Some("30"), Some("t"), Some("1"), b).unwrap();
        assert_eq!((s.token.as_str(), s.format), ("t", Format::Json));
        assert!(subscribe_params(None, Some("30"), None, None, b).is_none());
        assert!(subscribe_params(Some(""), Some("30"), None, None, b).is_none());
        assert!(subscribe_params(Some("a"), None, None, None, b).is_none());
        assert!(subscribe_params(Some("a"), Some("x"), None, None, b).is_none());
        assert!(subscribe_params(Some("a"), Some("0"), None, None, b).is_none());
        assert!(subscribe_params(Some("a"), Some("601"), None, None, b).is_none());
    }
}
