//! The embedded store's sweep, a step at a time: expired messages, push ids
//! past their dedupe window, idle sequences and the epochs they leave are
//! dropped in steps that each look at no more than [`STEP`] entries, inside
//! the writer's transaction of the moment. Appends queued behind a step wait
//! for a bounded scan, not for one over the whole file: the sweep used to
//! walk every table in one transaction, and appends waited 290 ms behind it
//! on a store of a few thousand messages in an e2e run (a store of millions
//! would have stopped writes for seconds every minute).

use crate::Retention;
use redb::{ReadableTable, Table};
use std::ops::Bound;

/// Entries one step looks at, at most.
pub(super) const STEP: usize = 1024;

/// Where the pass in progress stands: the table it is in and the last key
/// it looked at there (`None`: the table's start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Cursor {
    Msgs(Option<(String, u64)>),
    Ids(Option<(String, String)>),
    Seqs(Option<String>),
    Epochs(Option<String>),
}

impl Default for Cursor {
    fn default() -> Self {
        Cursor::Msgs(None)
    }
}

/// The tables a step works on, open in the writer's transaction.
pub(super) struct Tables<'a, 't> {
    pub msgs: &'a mut Table<'t, (&'static str, u64), (u64, &'static [u8])>,
    pub ids: &'a mut Table<'t, (&'static str, &'static str), (u64, u64)>,
    pub seq: &'a mut Table<'t, &'static str, (u64, u64)>,
    pub epochs: &'a mut Table<'t, &'static str, u64>,
}

/// The lower bound after `key` (the start when `None`).
fn after<K>(key: Option<K>) -> Bound<K> {
    key.map_or(Bound::Unbounded, Bound::Excluded)
}

/// Looks at up to [`STEP`] entries of `table` after `lower`, each key made
/// owned by `own`: those `due` says go, and the last one looked at when
/// the table has more (a step that saw fewer reached its end).
fn scan<K, V, O: Clone>(
    table: &Table<'_, K, V>,
    lower: Bound<K::SelfType<'_>>,
    own: impl for<'k> Fn(K::SelfType<'k>) -> O,
    mut due: impl for<'k> FnMut(&O, V::SelfType<'k>) -> Result<bool, redb::Error>,
) -> Result<(Vec<O>, Option<O>), redb::Error>
where
    K: redb::Key + 'static,
    V: redb::Value + 'static,
{
    let (mut gone, mut last, mut seen) = (Vec::new(), None, 0);
    for item in table.range((lower, Bound::Unbounded))?.take(STEP) {
        let (k, v) = item?;
        seen += 1;
        let key = own(k.value());
        if due(&key, v.value())? {
            gone.push(key.clone());
        }
        last = Some(key);
    }
    Ok((gone, last.filter(|_| seen == STEP)))
}

/// One step from `at`, at `now` (ms): drops what is due among the next
/// [`STEP`] entries of one table; where the next step starts, or `None`
/// once the pass has been through every table.
pub(super) fn step(
    t: Tables<'_, '_>,
    at: &Cursor,
    now: u64,
    retention: &Retention,
) -> Result<Option<Cursor>, redb::Error> {
    let chan = |c: &str| c.to_owned();
    Ok(match at {
        Cursor::Msgs(from) => {
            let lower = after(from.as_ref().map(|(c, m)| (c.as_str(), *m)));
            let (gone, more) = scan(
                t.msgs,
                lower,
                |(c, m)| (c.to_owned(), m),
                |_, (expire_at, _)| Ok(expire_at <= now),
            )?;
            for (c, mid) in &gone {
                t.msgs.remove((c.as_str(), *mid))?;
            }
            Some(more.map_or(Cursor::Ids(None), |k| Cursor::Msgs(Some(k))))
        }
        Cursor::Ids(from) => {
            let lower = after(from.as_ref().map(|(c, id)| (c.as_str(), id.as_str())));
            let (gone, more) = scan(
                t.ids,
                lower,
                |(c, id)| (c.to_owned(), id.to_owned()),
                |_, (_, until)| Ok(until <= now),
            )?;
            for (c, id) in &gone {
                t.ids.remove((c.as_str(), id.as_str()))?;
            }
            Some(more.map_or(Cursor::Seqs(None), |k| Cursor::Ids(Some(k))))
        }
        Cursor::Seqs(from) => {
            let idle_ms = retention.idle_ttl_seconds.saturating_mul(1000);
            let (gone, more) = scan(t.seq, after(from.as_deref()), chan, |_, (_, touched)| {
                Ok(touched.saturating_add(idle_ms) <= now)
            })?;
            // A forgotten sequence starts again at 1 under a new epoch.
            for c in &gone {
                t.seq.remove(c.as_str())?;
                t.epochs.remove(c.as_str())?;
            }
            Some(more.map_or(Cursor::Epochs(None), |k| Cursor::Seqs(Some(k))))
        }
        Cursor::Epochs(from) => {
            // Epochs whose sequence went some other way (files written
            // before sequences and epochs were dropped together).
            let seq = &*t.seq;
            let (gone, more) = scan(t.epochs, after(from.as_deref()), chan, |c, _| {
                Ok(seq.get(c.as_str())?.is_none())
            })?;
            for c in &gone {
                t.epochs.remove(c.as_str())?;
            }
            more.map(|k| Cursor::Epochs(Some(k)))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::super::{EPOCHS, IDS, MSGS, SEQ};
    use super::*;
    use redb::{Database, ReadableDatabase, ReadableTableMetadata};

    fn db() -> (tempfile::TempDir, Database) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Database::create(dir.path().join("s.redb")).expect("db");
        (dir, db)
    }

    /// Runs steps from the start until the pass ends; how many it took.
    fn pass(db: &Database, now: u64, retention: &Retention) -> usize {
        let mut at = Cursor::default();
        for n in 1.. {
            let tx = db.begin_write().expect("tx");
            let next = {
                let mut msgs = tx.open_table(MSGS).expect("msgs");
                let mut ids = tx.open_table(IDS).expect("ids");
                let mut seq = tx.open_table(SEQ).expect("seq");
                let mut epochs = tx.open_table(EPOCHS).expect("epochs");
                let t = Tables {
                    msgs: &mut msgs,
                    ids: &mut ids,
                    seq: &mut seq,
                    epochs: &mut epochs,
                };
                step(t, &at, now, retention).expect("step")
            };
            tx.commit().expect("commit");
            match next {
                Some(c) => at = c,
                None => return n,
            }
        }
        unreachable!()
    }

    #[test]
    fn a_pass_drops_what_is_due_in_every_table_step_by_step() {
        let (_dir, db) = db();
        let now = 1_000_000;
        let retention = Retention {
            idle_ttl_seconds: 10,
            ..Retention::default()
        };
        let tx = db.begin_write().expect("tx");
        {
            let mut msgs = tx.open_table(MSGS).expect("msgs");
            let mut ids = tx.open_table(IDS).expect("ids");
            let mut seq = tx.open_table(SEQ).expect("seq");
            let mut epochs = tx.open_table(EPOCHS).expect("epochs");
            // Three steps' worth of messages, every other one expired.
            for mid in 1..=(3 * STEP as u64) {
                let expire_at = if mid % 2 == 0 { now - 1 } else { now + 1 };
                msgs.insert(("k/a", mid), (expire_at, b"{}".as_slice()))
                    .expect("msg");
            }
            ids.insert(("k/a", "old"), (1, now)).expect("id");
            ids.insert(("k/a", "new"), (2, now + 1)).expect("id");
            // Idle for 10 s exactly: forgotten, with its epoch.
            seq.insert("k/idle", (4, now - 10_000)).expect("seq");
            epochs.insert("k/idle", 1).expect("epoch");
            seq.insert("k/a", (3 * STEP as u64, now - 9_999))
                .expect("seq");
            epochs.insert("k/a", 1).expect("epoch");
            // An epoch without its sequence.
            epochs.insert("k/orphan", 1).expect("epoch");
        }
        tx.commit().expect("commit");

        let steps = pass(&db, now, &retention);
        // Three full steps of messages and the one that finds their end,
        // then one step for each other table.
        assert_eq!(steps, 4 + 1 + 1 + 1, "steps");

        let tx = db.begin_read().expect("read");
        let msgs = tx.open_table(MSGS).expect("msgs");
        assert_eq!(msgs.len().expect("len"), 3 * STEP as u64 / 2);
        assert!(msgs
            .iter()
            .expect("iter")
            .all(|e| e.expect("entry").0.value().1 % 2 == 1));
        let ids = tx.open_table(IDS).expect("ids");
        let kept: Vec<String> = ids
            .iter()
            .expect("iter")
            .map(|e| e.expect("entry").0.value().1.to_owned())
            .collect();
        assert_eq!(kept, ["new"]);
        let seq = tx.open_table(SEQ).expect("seq");
        assert!(seq.get("k/idle").expect("get").is_none());
        assert!(seq.get("k/a").expect("get").is_some());
        let epochs = tx.open_table(EPOCHS).expect("epochs");
        let left: Vec<String> = epochs
            .iter()
            .expect("iter")
            .map(|e| e.expect("entry").0.value().to_owned())
            .collect();
        assert_eq!(left, ["k/a"]);
    }

    #[test]
    fn a_pass_over_empty_tables_is_one_step_per_table() {
        let (_dir, db) = db();
        assert_eq!(pass(&db, 1, &Retention::default()), 4);
    }
}
