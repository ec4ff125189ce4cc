//! The SSE subscription's parameters (query string and `Last-Event-ID`) on
//! arbitrary and adversarial input: whatever a browser's form encoder makes
//! of any key, token and mid comes back exactly; a mid is accepted exactly
//! when it is a non-negative decimal; the header wins over `last_id=`; a
//! later repeat of a name wins; noise never panics and is refused with a
//! reason or read as what it encodes. A sample runs in `make test`; a million
//! cases with `-- --ignored` (release).

use push_comet::protocol::{parse_sse, SseError};
use pushcluster_core::fuzz::{tally, Rng};

/// Text with the characters a query string makes hard: separators, escapes,
/// multi-byte and control characters.
fn text(r: &mut Rng) -> String {
    let alphabet = [
        'a', 'Z', '0', '&', '=', '%', '+', ' ', '?', '#', 'ü', '€', '𝄞', '\u{0}', '\n', '/',
    ];
    (0..r.below(12))
        .map(|_| alphabet[r.below(alphabet.len() as u64) as usize])
        .collect()
}

/// A mid as a client might send it, and whether it is one.
fn mid(r: &mut Rng) -> (String, bool) {
    match r.below(8) {
        0 => (String::new(), true),
        1 => (format!("-{}", r.below(100)), false),
        2 => ("9223372036854775808".into(), false),
        3 => (format!(" {} ", r.below(1000)), true),
        4 => (format!("+{}", r.below(10)), false),
        // Random text is a mid only if it happens to be digits or blank.
        5 => {
            let t = text(r);
            let ok = is_mid(&t);
            (t, ok)
        }
        _ => (r.below(1 << 40).to_string(), true),
    }
}

/// Whether `s` is a mid by the rule's own words (not the parser's code).
fn is_mid(s: &str) -> bool {
    let t = s.trim();
    t.is_empty() || (t.bytes().all(|b| b.is_ascii_digit()) && t.parse::<i64>().is_ok())
}

/// What [`compare`] counts, in its order.
const BRANCHES: [&str; 3] = ["accepted", "refused", "noise"];

fn compare(seed: u64, cases: u64) -> [u64; 3] {
    let mut r = Rng::new(seed);
    let mut seen = [0u64; 3];
    for case in 0..cases {
        if r.chance(10) {
            // Noise: any bytes as query and header.
            let (nq, nh) = (r.below(40) as usize, r.below(12) as usize);
            let q = String::from_utf8_lossy(&r.bytes(nq)).into_owned();
            let h = r.bytes(nh);
            let _ = parse_sse(&q, r.chance(50).then_some(&h[..]));
            seen[2] += 1;
            continue;
        }
        let (key, token) = (text(&mut r), text(&mut r));
        let (last_id, last_ok) = mid(&mut r);
        let header = r.chance(30).then(|| mid(&mut r));
        let mut form = form_urlencoded::Serializer::new(String::new());
        if r.chance(20) {
            form.append_pair("key", "an-earlier-key");
        }
        form.append_pair("key", &key);
        form.append_pair("token", &token);
        if r.chance(70) {
            form.append_pair("last_id", &last_id);
        }
        if r.chance(20) {
            form.append_pair("other", &text(&mut r));
        }
        let query = form.finish();
        let sent_last = query.contains("last_id=");
        let got = parse_sse(&query, header.as_ref().map(|(h, _)| h.as_bytes()));
        // What the rule says, from the inputs alone.
        let (effective, effective_ok) = match &header {
            Some((h, ok)) => (h.clone(), *ok),
            None if sent_last => (last_id.clone(), last_ok),
            None => (String::new(), true),
        };
        assert_eq!(
            effective_ok,
            is_mid(&effective),
            "generator disagrees on {effective:?}"
        );
        let want = if !effective_ok {
            Err(SseError::BadLastId)
        } else if key.is_empty() {
            Err(SseError::NoKey)
        } else {
            let t = effective.trim();
            Ok((
                key.clone(),
                token.clone(),
                (!t.is_empty()).then(|| t.parse::<i64>().unwrap_or(-1)),
            ))
        };
        let got_cmp = got.map(|g| (g.key, g.token, g.last));
        assert_eq!(
            got_cmp, want,
            "case {case}: query {query:?} header {header:?}"
        );
        seen[if want.is_ok() { 0 } else { 1 }] += 1;
    }
    seen
}

#[test]
fn a_sample_of_sse_requests_is_read_as_the_rule_says() {
    tally(20_000, &BRANCHES, &compare(0x5EED, 20_000), Some(100));
}

#[test]
#[ignore = "a million cases: run with --release -- --ignored"]
fn a_million_sse_requests_are_read_as_the_rule_says() {
    tally(1_000_000, &BRANCHES, &compare(0xC0FFEE, 1_000_000), None);
}
