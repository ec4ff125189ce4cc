//! Validation of subscription keys, message bodies and expiry, shared by every
//! service so a limit means the same thing at the edge and in storage.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Limits applied to what back ends and clients send.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "snake_case", deny_unknown_fields)]
pub struct Limits {
    /// Longest key accepted, in bytes.
    pub max_key_bytes: usize,
    /// Largest message body accepted, in bytes.
    pub max_message_bytes: usize,
    /// Expiry used when a push gives none (or 0), in seconds.
    pub default_expire_seconds: u64,
    /// Longest expiry accepted, in seconds.
    pub max_expire_seconds: u64,
    /// Most keys in one multi-push.
    pub max_keys_per_multipush: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_key_bytes: 256,
            max_message_bytes: 64 * 1024,
            default_expire_seconds: 24 * 3600,
            max_expire_seconds: 30 * 24 * 3600,
            max_keys_per_multipush: 1000,
        }
    }
}

/// Why a key, body or expiry was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InputError {
    #[error("key is empty")]
    EmptyKey,
    #[error("key is {0} bytes, longer than the limit of {1}")]
    KeyTooLong(usize, usize),
    #[error("key contains a control, whitespace or ',' character")]
    KeyCharacter,
    #[error("message is empty")]
    EmptyMessage,
    #[error("message is {0} bytes, larger than the limit of {1}")]
    MessageTooLarge(usize, usize),
    #[error("message is not valid JSON: {0}")]
    MessageNotJson(String),
    #[error("expire {0} s is beyond the limit of {1} s")]
    ExpireTooLong(u64, u64),
    #[error("{0} keys in one multi-push, more than the limit of {1}")]
    TooManyKeys(usize, usize),
    #[error("push_id must be 1-64 characters of [A-Za-z0-9_-]")]
    PushId,
}

/// Checks a push id (empty: none): it becomes part of a storage key, so it
/// is short and plain.
pub fn check_push_id(id: &str) -> Result<(), InputError> {
    let plain = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
    if id.len() > 64 || !id.bytes().all(plain) {
        return Err(InputError::PushId);
    }
    Ok(())
}

impl Limits {
    /// Checks a subscription key. Commas are refused because multi-push lists keys
    /// separated by commas; whitespace and control characters because the TCP
    /// protocol and logs would mangle them.
    pub fn check_key(&self, key: &str) -> Result<(), InputError> {
        if key.is_empty() {
            return Err(InputError::EmptyKey);
        }
        if key.len() > self.max_key_bytes {
            return Err(InputError::KeyTooLong(key.len(), self.max_key_bytes));
        }
        if key
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || c == ',')
        {
            return Err(InputError::KeyCharacter);
        }
        Ok(())
    }

    /// Checks that a message body is non-empty, within the size limit and JSON.
    pub fn check_message(&self, body: &[u8]) -> Result<(), InputError> {
        if body.is_empty() {
            return Err(InputError::EmptyMessage);
        }
        if body.len() > self.max_message_bytes {
            return Err(InputError::MessageTooLarge(
                body.len(),
                self.max_message_bytes,
            ));
        }
        // Checked apart from the JSON parse, which may skip over string contents.
        std::str::from_utf8(body).map_err(|e| InputError::MessageNotJson(e.to_string()))?;
        serde_json::from_slice::<serde::de::IgnoredAny>(body)
            .map_err(|e| InputError::MessageNotJson(e.to_string()))?;
        Ok(())
    }

    /// Turns a requested expiry (0 = default) into a duration within the limit.
    pub fn expire(&self, seconds: u64) -> Result<Duration, InputError> {
        let s = if seconds == 0 {
            self.default_expire_seconds
        } else {
            seconds
        };
        if s > self.max_expire_seconds {
            return Err(InputError::ExpireTooLong(s, self.max_expire_seconds));
        }
        Ok(Duration::from_secs(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        let l = Limits::default();
        assert_eq!(l.check_key("alice"), Ok(()));
        assert_eq!(l.check_key("user:42/device-é"), Ok(()));
        assert_eq!(l.check_key(""), Err(InputError::EmptyKey));
        assert_eq!(l.check_key("a b"), Err(InputError::KeyCharacter));
        assert_eq!(l.check_key("a,b"), Err(InputError::KeyCharacter));
        assert_eq!(l.check_key("a\r\n"), Err(InputError::KeyCharacter));
        let long = "k".repeat(257);
        assert_eq!(l.check_key(&long), Err(InputError::KeyTooLong(257, 256)));
    }

    #[test]
    fn messages() {
        let l = Limits {
            max_message_bytes: 16,
            ..Limits::default()
        };
        assert_eq!(l.check_message(br#"{"a":1}"#), Ok(()));
        assert_eq!(l.check_message(b"\"text\""), Ok(()));
        assert_eq!(l.check_message(b""), Err(InputError::EmptyMessage));
        assert!(l.check_message(b"\"\xff\"").is_err());
        assert!(matches!(
            l.check_message(b"{not json"),
            Err(InputError::MessageNotJson(_))
        ));
        assert_eq!(
            l.check_message(br#"{"aaaaaaaaaaaaaaa":1}"#),
            Err(InputError::MessageTooLarge(21, 16))
        );
    }

    #[test]
    fn push_ids() {
        assert_eq!(check_push_id(""), Ok(()));
        assert_eq!(check_push_id("0123abcdef-_X"), Ok(()));
        assert_eq!(check_push_id(&"a".repeat(64)), Ok(()));
        assert_eq!(check_push_id(&"a".repeat(65)), Err(InputError::PushId));
        assert_eq!(check_push_id("a:b"), Err(InputError::PushId));
        assert_eq!(check_push_id("a b"), Err(InputError::PushId));
    }

    #[test]
    fn expiry() {
        let l = Limits::default();
        assert_eq!(l.expire(0), Ok(Duration::from_secs(86400)));
        assert_eq!(l.expire(60), Ok(Duration::from_secs(60)));
        assert!(l.expire(l.max_expire_seconds + 1).is_err());
    }
}
