//! A service's YAML config file, and what happens to settings it does not know.
//!
//! The config types refuse unknown fields (`deny_unknown_fields`), so a
//! typo in a hand-written file stops the service with the field's name
//! and the ones it could have meant. On Kubernetes the file is rendered by
//! the operator, which may be newer than the image a PushCluster runs
//! (`spec.image` is the user's): a setting added in the operator's version
//! would then stop every pod of the older image that starts, a rolling
//! update included. The operator therefore sets [`UNKNOWN_SETTINGS_ENV`]
//! to `warn`: such a service drops what it does not know, says so in its
//! log, and runs as its own version would.

use serde::de::DeserializeOwned;
use serde_yaml::Value;
use std::path::{Path, PathBuf};

/// The variable that picks an [`UnknownSettings`] (the flag is
/// `--unknown-settings`).
pub const UNKNOWN_SETTINGS_ENV: &str = "PUSH_UNKNOWN_SETTINGS";

/// What a service does with a setting in its config file that it does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum UnknownSettings {
    /// Refuse to start, naming it: a typo never goes unnoticed.
    #[default]
    Refuse,
    /// Start without it, with a warning naming it: for files written by a
    /// newer operator than this binary.
    Warn,
}

/// How many unknown settings `warn` drops before it gives up on a file
/// (each one costs a parse of the whole file).
const MAX_DROPPED: usize = 64;

/// A config file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("invalid config {0}: {1}")]
    Parse(PathBuf, serde_yaml::Error),
    #[error("invalid config {0}: {1}")]
    Invalid(PathBuf, String),
}

/// Reads a YAML config file into `T`, or `T::default()` when no path is
/// given; with [`UnknownSettings::Warn`], settings `T` does not know are
/// dropped and logged.
pub fn load_yaml<T: DeserializeOwned + Default>(
    path: Option<&Path>,
    unknown: UnknownSettings,
) -> Result<T, ConfigError> {
    let Some(p) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(p).map_err(|e| ConfigError::Read(p.into(), e))?;
    match unknown {
        UnknownSettings::Refuse => {
            serde_yaml::from_str(&text).map_err(|e| ConfigError::Parse(p.into(), e))
        }
        UnknownSettings::Warn => {
            let (config, dropped) = parse_dropping_unknown(&text).map_err(|e| match e {
                Dropping::Yaml(e) => ConfigError::Parse(p.into(), e),
                Dropping::Invalid(e) => ConfigError::Invalid(p.into(), e),
            })?;
            for setting in dropped {
                tracing::warn!(config = %p.display(), setting, "config: a setting this version does not know, ignored (a newer operator's, or a typo)");
            }
            Ok(config)
        }
    }
}

/// Why [`parse_dropping_unknown`] failed.
#[derive(Debug)]
enum Dropping {
    /// Not YAML at all.
    Yaml(serde_yaml::Error),
    /// YAML, but not a config: `path: message`.
    Invalid(String),
}

/// Parses `text` into `T`, dropping every mapping entry `T` (or a type
/// within it) refuses as an unknown field; returns the dotted paths of the
/// dropped ones. Errors of any other kind stand.
fn parse_dropping_unknown<T: DeserializeOwned>(text: &str) -> Result<(T, Vec<String>), Dropping> {
    let mut doc: Value = serde_yaml::from_str(text).map_err(Dropping::Yaml)?;
    let mut dropped = Vec::new();
    loop {
        let e = match serde_path_to_error::deserialize::<_, T>(doc.clone()) {
            Ok(config) => return Ok((config, dropped)),
            Err(e) => e,
        };
        let path = e.path().clone();
        let message = e.inner().to_string();
        let removed = unknown_field(&message)
            .filter(|_| dropped.len() < MAX_DROPPED)
            .and_then(|field| remove(&mut doc, &path, field));
        match removed {
            Some(setting) => dropped.push(setting),
            None => return Err(Dropping::Invalid(format!("{path}: {message}"))),
        }
    }
}

/// The field an error names as unknown: serde's derive words it as
/// "unknown field `name`, expected …" (or "…, there are no fields").
fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split_once('`').map(|(field, _)| field)
}

/// Removes `field` from the mapping at `path` in `doc` (or, when the path
/// already ends at the field, from its parent); returns its dotted path.
fn remove(doc: &mut Value, path: &serde_path_to_error::Path, field: &str) -> Option<String> {
    use serde_path_to_error::Segment;
    let mut segments: Vec<&Segment> = path.iter().collect();
    if matches!(segments.last(), Some(Segment::Map { key }) if key == field) {
        segments.pop();
    }
    let mut at = &mut *doc;
    let mut dotted = Vec::new();
    for s in segments {
        at = match s {
            Segment::Map { key } => {
                dotted.push(key.clone());
                at.get_mut(key.as_str())?
            }
            Segment::Seq { index } => {
                dotted.push(index.to_string());
                at.get_mut(*index)?
            }
            // An externally tagged enum's variant is a mapping key too;
            // `Unknown` (a path serde lost track of) cannot be followed.
            Segment::Enum { variant } => {
                dotted.push(variant.clone());
                at.get_mut(variant.as_str())?
            }
            Segment::Unknown => return None,
        };
    }
    at.as_mapping_mut()?.remove(field)?;
    dotted.push(field.to_owned());
    Some(dotted.join("."))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Config {
        listen: String,
        limits: Limits,
        comets: Vec<Comet>,
        membership: Membership,
    }

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Limits {
        max: u32,
    }

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Comet {
        shard: u32,
    }

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
    enum Membership {
        #[default]
        Static,
        Lease {
            shards: u32,
        },
    }

    const NEWER: &str = "
listen: a
future: 1
limits: { max: 3, soon: true }
comets:
  - { shard: 0 }
  - { shard: 1, zone: b }
membership: { kind: lease, shards: 2, renew: 5 }
";

    #[test]
    fn warn_drops_what_this_version_does_not_know_at_any_depth() {
        let (c, mut dropped) = parse_dropping_unknown::<Config>(NEWER).expect("parses");
        dropped.sort();
        assert_eq!(
            c,
            Config {
                listen: "a".into(),
                limits: Limits { max: 3 },
                comets: vec![Comet { shard: 0 }, Comet { shard: 1 }],
                membership: Membership::Lease { shards: 2 },
            }
        );
        assert_eq!(
            dropped,
            ["comets.1.zone", "future", "limits.soon", "membership.renew"]
        );
    }

    #[test]
    fn refuse_names_the_unknown_setting() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, "listen: a\nlimits: { maxx: 3 }\n").expect("write");
        let e = load_yaml::<Config>(Some(&path), UnknownSettings::Refuse).expect_err("refused");
        let text = e.to_string();
        assert!(text.contains("unknown field `maxx`"), "{text}");
        let c = load_yaml::<Config>(Some(&path), UnknownSettings::Warn).expect("warned");
        assert_eq!(c.limits, Limits { max: 0 });
    }

    #[test]
    fn warn_leaves_every_other_error_standing() {
        let e = parse_dropping_unknown::<Config>("limits: { max: many, soon: 1 }\n")
            .expect_err("a wrong type is no unknown setting");
        let Dropping::Invalid(text) = e else {
            panic!("not YAML? {e:?}")
        };
        assert!(text.starts_with("limits.max: invalid type"), "{text}");
        let e = parse_dropping_unknown::<Config>("membership: { kind: gossip }\n")
            .expect_err("an unknown kind is no unknown setting");
        assert!(
            matches!(e, Dropping::Invalid(ref t) if t.contains("gossip")),
            "{e:?}"
        );
        assert!(matches!(
            parse_dropping_unknown::<Config>("listen: [unclosed\n"),
            Err(Dropping::Yaml(_))
        ));
    }

    #[test]
    fn unknown_fields_are_read_from_serdes_words() {
        assert_eq!(
            unknown_field("unknown field `zone`, expected `shard`"),
            Some("zone")
        );
        assert_eq!(
            unknown_field("unknown field `x`, there are no fields"),
            Some("x")
        );
        assert_eq!(unknown_field("unknown variant `gossip`"), None);
    }
}
