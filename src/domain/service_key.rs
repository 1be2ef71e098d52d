//! The server's own API keys (the part RapidAPI played for the hosted service), and their limits.

use super::TokenHash;
use super::token::random_hex;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The limits of one key; `None` means unlimited.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_day: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_month: Option<u64>,
    /// Requests per second (a token bucket holding one second's worth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// Requests of this key running at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
    /// Tokens (input plus output) per UTC day, and per calendar month (UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_day: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_month: Option<u64>,
}

/// A key as stored: never the key itself, only its hash (kept apart).
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceKey {
    /// Short public identifier, e.g. `key_3f9a1c2b`.
    pub id: String,
    pub name: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
    pub limits: KeyLimits,
}

/// A freshly generated key, printed once: `ofk_` and 48 hex characters (192 bits from the OS random source).
pub struct ApiKey(String);

impl ApiKey {
    pub fn generate() -> Result<Self, rand::rand_core::OsError> {
        Ok(Self(format!("ofk_{}", random_hex(24)?)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> TokenHash {
        TokenHash::of(&self.0)
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// A new key id: `key_` and 8 hex characters.
pub fn new_key_id() -> Result<String, rand::rand_core::OsError> {
    Ok(format!("key_{}", random_hex(4)?))
}
