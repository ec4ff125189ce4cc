//! The comet's RESP parser (the TCP `sub` command) against the redis crate's
//! parser as the reference, on arbitrary and adversarial byte streams: what
//! ours accepts, redis reads as the same array of bulk strings; what redis
//! reads as such an array within our limits (at most 8 arguments of at most
//! 4096 bytes, UTF-8, lengths in plain decimal), ours accepts the same; what
//! ours waits on, redis cannot finish either. A sample runs in `make test`; a
//! million cases with `-- --ignored` (release).

use push_comet::protocol::parse_command;
use pushcluster_core::fuzz::{tally, Rng};
use redis::Value;

/// A length line: usually plain decimal, sometimes not.
fn number(r: &mut Rng, n: usize) -> String {
    match r.below(20) {
        0 => format!("+{n}"),
        1 => format!("0{n}"),
        2 => format!("{n} "),
        3 => "-1".into(),
        4 => "x".into(),
        _ => n.to_string(),
    }
}

fn stream(r: &mut Rng) -> Vec<u8> {
    let mut s = Vec::new();
    if r.chance(10) {
        return (0..r.below(30)).map(|_| r.next_u64() as u8).collect();
    }
    let n = match r.below(10) {
        0 => 0,
        1 => 9 + r.below(3) as usize,
        _ => 1 + r.below(5) as usize,
    };
    s.push(if r.chance(97) { b'*' } else { b'+' });
    s.extend(number(r, n).bytes());
    s.extend(if r.chance(97) {
        &b"\r\n"[..]
    } else {
        &b"\n"[..]
    });
    for _ in 0..n {
        let arg: Vec<u8> = match r.below(10) {
            0 => vec![0xFF, b'a'],
            1 => vec![b'x'; 4090 + r.below(10) as usize],
            2 => Vec::new(),
            _ => "sub alice 30 tok ü".as_bytes()[..r.below(19) as usize].to_vec(),
        };
        let arg = if std::str::from_utf8(&arg).is_err() && arg.len() > 1 && arg[0] != 0xFF {
            b"ok".to_vec()
        } else {
            arg
        };
        s.push(if r.chance(98) { b'$' } else { b':' });
        let declared = if r.chance(95) {
            arg.len()
        } else {
            arg.len() + 1
        };
        s.extend(number(r, declared).bytes());
        s.extend(b"\r\n");
        s.extend(&arg);
        s.extend(if r.chance(97) {
            &b"\r\n"[..]
        } else {
            &b"\rx"[..]
        });
    }
    if r.chance(20) {
        s.extend(b"*1\r\n$1\r\nh\r\n");
    }
    if r.chance(25) {
        s.truncate(r.below(s.len() as u64 + 1) as usize);
    }
    if r.chance(10) && !s.is_empty() {
        let i = r.below(s.len() as u64) as usize;
        s[i] ^= 1 << r.below(8);
    }
    s
}

/// The arguments redis reads from `bytes`, when it reads an array of bulk
/// strings within our limits whose lengths are plain decimal.
fn reference(bytes: &[u8]) -> Option<Vec<Vec<u8>>> {
    let Ok(Value::Array(items)) = redis::parse_redis_value(bytes) else {
        return None;
    };
    let args: Option<Vec<Vec<u8>>> = items
        .into_iter()
        .map(|v| match v {
            Value::BulkString(b) => Some(b),
            _ => None,
        })
        .collect();
    args.filter(|a| {
        (1..=8).contains(&a.len())
            && a.iter()
                .all(|b| b.len() <= 4096 && std::str::from_utf8(b).is_ok())
    })
}

/// Whether every length line in the array at the front of `bytes` is plain
/// decimal (no sign, no leading zero, no space), the only form ours takes.
fn plain_lengths(bytes: &[u8]) -> bool {
    let mut pos = 0;
    let line = |pos: &mut usize| -> Option<(u8, String)> {
        let rest = bytes.get(*pos..)?;
        let end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .filter(|e| *e > 0)?;
        let l = std::str::from_utf8(&rest[1..end]).ok()?.to_owned();
        let kind = rest[0];
        *pos += end + 2;
        Some((kind, l))
    };
    let plain = |s: &str| {
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'))
    };
    let Some((b'*', n)) = line(&mut pos) else {
        return false;
    };
    if !plain(&n) {
        return false;
    }
    for _ in 0..n.parse::<usize>().unwrap_or(0) {
        let Some((b'$', len)) = line(&mut pos) else {
            return false;
        };
        if !plain(&len) {
            return false;
        }
        pos += len.parse::<usize>().unwrap_or(0) + 2;
    }
    true
}

/// What [`compare`] counts, in its order.
const BRANCHES: [&str; 3] = ["accepted", "incomplete", "refused"];

fn compare(seed: u64, cases: u64) -> [u64; 3] {
    let mut r = Rng::new(seed);
    let mut seen = [0u64; 3];
    for case in 0..cases {
        let s = stream(&mut r);
        let ours = parse_command(&s);
        match &ours {
            Ok(Some((args, used))) => {
                seen[0] += 1;
                let theirs = reference(&s[..*used]);
                let args: Vec<Vec<u8>> = args.iter().map(|a| a.clone().into_bytes()).collect();
                assert_eq!(
                    theirs,
                    Some(args),
                    "case {case}: accepted what redis reads otherwise: {s:02x?}"
                );
            }
            Ok(None) => {
                seen[1] += 1;
                assert_eq!(
                    reference(&s),
                    None,
                    "case {case}: waits on what redis reads whole: {s:02x?}"
                );
            }
            Err(_) => {
                seen[2] += 1;
                if plain_lengths(&s) {
                    assert_eq!(
                        reference(&s),
                        None,
                        "case {case}: refused what redis reads within the limits: {s:02x?}"
                    );
                }
            }
        }
    }
    seen
}

#[test]
fn a_sample_of_commands_gets_the_same_verdict_as_redis() {
    tally(20_000, &BRANCHES, &compare(0x5EED, 20_000), Some(100));
}

#[test]
#[ignore = "a million cases: run with --release -- --ignored"]
fn a_million_commands_get_the_same_verdict_as_redis() {
    tally(1_000_000, &BRANCHES, &compare(0xC0FFEE, 1_000_000), None);
}
