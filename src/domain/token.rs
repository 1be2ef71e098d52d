//! Access tokens of private requests: 128 bits from the OS random source, shown once, stored as SHA-256 hashes
//! and compared in constant time.

use rand::TryRngCore;
use rand::rngs::OsRng;
use sha2::{Digest, Sha256};
use std::fmt;
use subtle::ConstantTimeEq;

/// A freshly generated token, as handed to the caller once in the create response.
pub struct AccessToken(String);

/// `n` bytes from the OS random source, as lowercase hex.
pub fn random_hex(n: usize) -> Result<String, rand::rand_core::OsError> {
    let mut bytes = vec![0u8; n];
    OsRng.try_fill_bytes(&mut bytes)?;
    Ok(hex::encode(bytes))
}

impl AccessToken {
    /// 16 bytes from the OS random source, as 32 lowercase hex characters (the OffloadGPT format).
    pub fn generate() -> Result<Self, rand::rand_core::OsError> {
        random_hex(16).map(Self)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> TokenHash {
        TokenHash::of(&self.0)
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccessToken(<redacted>)")
    }
}

/// What the store keeps of a token.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    pub fn of(token: &str) -> Self {
        Self(Sha256::digest(token.as_bytes()).into())
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Constant-time comparison of a presented token against this hash.
    pub fn verify(&self, presented: &str) -> bool {
        TokenHash::of(presented).0.ct_eq(&self.0).into()
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenHash(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_128_bit_hex_and_verify_only_themselves() {
        let a = AccessToken::generate().unwrap();
        let b = AccessToken::generate().unwrap();
        assert_eq!(a.as_str().len(), 32);
        assert!(a.as_str().bytes().all(|c| c.is_ascii_hexdigit()));
        assert!(a.hash().verify(a.as_str()));
        assert!(!a.hash().verify(b.as_str()));
        assert!(!a.hash().verify(""));
    }
}
