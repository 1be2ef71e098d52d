//! The upstream API key: held in a type that cannot be printed, logged or serialised.

use std::fmt;

/// An OpenAI API key. No `Display`, no `Serialize`; `Debug` prints a placeholder. It is moved into the one
/// upstream call that uses it and dropped when the request headers are built.
#[derive(Clone)]
pub struct UpstreamKey(String);

impl UpstreamKey {
    /// `None` for an empty or whitespace-only value, so that an empty header means "no key".
    pub fn new(value: &str) -> Option<Self> {
        let value = value.trim();
        (!value.is_empty()).then(|| Self(value.to_owned()))
    }

    /// The key itself, for the `Authorization` header of the upstream call and nothing else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for UpstreamKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UpstreamKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_key() {
        let key = UpstreamKey::new("sk-very-secret").unwrap();
        assert!(!format!("{key:?}").contains("secret"));
        assert!(UpstreamKey::new("  ").is_none());
    }
}
