//! Any URL the server handed out for a request (status `.json`, stream `.txt`, raw `.raw`, `/stop`) names the
//! same request: from one of them the client builds the others.

use super::ClientError;
use url::Url;

/// A request on a server, from one of its URLs.
#[derive(Debug, Clone)]
pub struct RequestUrl {
    /// The URL without suffix or query: `{base}/{kind}/r/{pub|priv}/.../{id}`.
    base: Url,
    /// `?stream_token=` as given in a stream URL (it opens only the stream).
    stream_token: Option<String>,
    /// `?last_event_id=` as given in a stream URL.
    last_event_id: Option<u64>,
    /// `/1/r/` requests have an event stream; `/2/r/` (async) ones only a status document.
    stream: bool,
}

const SUFFIXES: [&str; 4] = [".json", ".txt", ".raw", "/stop"];

impl RequestUrl {
    pub fn parse(text: &str) -> Result<Self, ClientError> {
        let bad = |why: &str| {
            ClientError::Usage(format!(
                "`{text}` is not a request URL ({why}): give the status_url (...json) or stream_events_url (...txt) the server handed out"
            ))
        };
        let url = Url::parse(text.trim()).map_err(|e| bad(&e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad("not http or https"));
        }
        let path = url.path();
        let stem = SUFFIXES.iter().find_map(|s| path.strip_suffix(s)).ok_or_else(|| bad("unknown suffix"))?;
        let stream = match stem.rfind("/r/p") {
            Some(at) => !stem[..at].ends_with("/2"),
            None => return Err(bad("no `/r/pub/` or `/r/priv/` in its path")),
        };
        let mut stream_token = None;
        let mut last_event_id = None;
        for (name, value) in url.query_pairs() {
            match name.as_ref() {
                "stream_token" => stream_token = Some(value.into_owned()),
                "last_event_id" => last_event_id = value.parse().ok(),
                _ => {}
            }
        }
        let mut base = url.clone();
        base.set_path(stem);
        base.set_query(None);
        base.set_fragment(None);
        Ok(Self { base, stream_token, last_event_id, stream })
    }

    fn with_suffix(&self, suffix: &str) -> Url {
        let mut url = self.base.clone();
        url.set_path(&format!("{}{suffix}", self.base.path()));
        url
    }

    pub fn status(&self) -> Url {
        self.with_suffix(".json")
    }

    /// The stream URL, with the `stream_token` it came with (when no bearer token is used).
    pub fn events(&self) -> Url {
        let mut url = self.with_suffix(".txt");
        if let Some(token) = &self.stream_token {
            url.query_pairs_mut().append_pair("stream_token", token);
        }
        url
    }

    pub fn stop(&self) -> Url {
        self.with_suffix("/stop")
    }

    pub fn is_stream(&self) -> bool {
        self.stream
    }

    pub fn last_event_id(&self) -> Option<u64> {
        self.last_event_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "http://h:1/x/1/r/priv/2026/01/02/03/04/05/0a1b";

    #[test]
    fn every_suffix_names_the_same_request() {
        for suffix in SUFFIXES {
            let url = RequestUrl::parse(&format!("{BASE}{suffix}")).unwrap();
            assert_eq!(url.status().as_str(), format!("{BASE}.json"));
            assert_eq!(url.stop().as_str(), format!("{BASE}/stop"));
            assert!(url.is_stream());
        }
    }

    #[test]
    fn stream_token_and_last_event_id_come_from_the_query() {
        let url = RequestUrl::parse(&format!("{BASE}.txt?stream_token=abc&last_event_id=7")).unwrap();
        assert_eq!(url.events().as_str(), format!("{BASE}.txt?stream_token=abc"));
        assert_eq!(url.status().as_str(), format!("{BASE}.json"));
        assert_eq!(url.last_event_id(), Some(7));
    }

    #[test]
    fn async_requests_are_told_apart() {
        let url = RequestUrl::parse("http://h/2/r/pub/2026/01/02/03/04/05/0a1b.json").unwrap();
        assert!(!url.is_stream());
    }

    #[test]
    fn other_urls_are_refused() {
        for bad in ["http://h/v1/stream-chatgpt", "ftp://h/1/r/pub/x.json", "not a url", "http://h/1/x/pub/a.json"] {
            assert!(RequestUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
