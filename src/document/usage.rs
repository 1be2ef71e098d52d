//! The tokens a response body reports (`usage`), in either OpenAI shape: Chat Completions
//! (`prompt_tokens`/`completion_tokens`) or the Responses API (`input_tokens`/`output_tokens`).

use serde::Deserialize;
use serde_json::Value;
use std::borrow::Cow;

/// A finished request's tokens as its upstream counted them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    /// The model the upstream answered with (empty when it named none).
    pub model: String,
    pub input: u64,
    pub output: u64,
}

#[derive(Deserialize)]
struct Body<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default, alias = "input_tokens")]
    prompt_tokens: Option<u64>,
    #[serde(default, alias = "output_tokens")]
    completion_tokens: Option<u64>,
}

impl Tokens {
    fn of(model: Option<&str>, usage: Usage) -> Option<Self> {
        if usage.prompt_tokens.is_none() && usage.completion_tokens.is_none() {
            return None;
        }
        Some(Self {
            model: model.unwrap_or_default().to_owned(),
            input: usage.prompt_tokens.unwrap_or(0),
            output: usage.completion_tokens.unwrap_or(0),
        })
    }

    /// The tokens of a body given as JSON text (an upstream's whole answer); `None` without a usage.
    pub fn of_json(body: &str) -> Option<Self> {
        let body: Body<'_> = serde_json::from_str(body).ok()?;
        Self::of(body.model.as_deref(), body.usage?)
    }

    /// The tokens of a `usage` value, for a body answered by `model`.
    pub fn of_usage(model: Option<&str>, usage: &Value) -> Option<Self> {
        Self::of(model, Usage::deserialize(usage).ok()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_shapes_are_read() {
        let chat = r#"{"model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}"#;
        assert_eq!(Tokens::of_json(chat), Some(Tokens { model: "m".into(), input: 3, output: 5 }));
        let responses = serde_json::json!({"input_tokens": 2, "output_tokens": 7, "total_tokens": 9});
        assert_eq!(Tokens::of_usage(None, &responses), Some(Tokens { model: String::new(), input: 2, output: 7 }));
        assert_eq!(Tokens::of_json(r#"{"model":"m"}"#), None);
        assert_eq!(Tokens::of_json("not json"), None);
        assert_eq!(Tokens::of_usage(Some("m"), &serde_json::json!({})), None);
    }
}
