//! The endpoint URL of a request: `/{kind}/r/{pub|priv}/{YYYY}/{MM}/{DD}/{HH}/{MM}/{SS}/{id}` plus a suffix.

use super::{Access, Kind, RequestId};
use time::OffsetDateTime;

/// Which endpoint of a request a URL names.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Suffix {
    /// `.json`: the status document.
    Status,
    /// `.txt`: the event stream.
    Events,
    /// `.raw`: the raw upstream response.
    Raw,
    /// `/stop`: the stop switch.
    Stop,
}

/// Everything a URL says about a request. A URL is only valid for a request whose stored kind, access and
/// creation time all match it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Locator {
    pub kind: Kind,
    pub access: Access,
    /// Unix seconds, UTC.
    pub created_at: i64,
    pub id: RequestId,
}

/// The date part of a URL as written, checked against the stored `created_at` when the request is found.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct UrlDate([u16; 6]);

impl UrlDate {
    fn of(created_at: i64) -> Option<Self> {
        let t = OffsetDateTime::from_unix_timestamp(created_at).ok()?;
        let year = u16::try_from(t.year()).ok()?;
        Some(Self([
            year,
            u8::from(t.month()).into(),
            t.day().into(),
            t.hour().into(),
            t.minute().into(),
            t.second().into(),
        ]))
    }
}

/// A URL parsed from its path; `matches` checks it against the stored request.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ParsedUrl {
    pub kind: Kind,
    pub access: Access,
    pub date: UrlDate,
    pub id: RequestId,
    pub suffix: Suffix,
}

impl ParsedUrl {
    pub fn matches(&self, locator: &Locator) -> bool {
        self.kind == locator.kind
            && self.access == locator.access
            && self.id == locator.id
            && UrlDate::of(locator.created_at) == Some(self.date)
    }

    /// Parses the path segments after `{kind}/r/`. Anything malformed is `None` (a 404 to the caller).
    pub fn from_segments(kind: &str, rest: &[&str]) -> Option<Self> {
        let kind = Kind::from_code(kind.parse().ok()?)?;
        let (access, date, last, stop) = match rest {
            [access, y, mo, d, h, mi, s, last] => (access, [y, mo, d, h, mi, s], *last, false),
            [access, y, mo, d, h, mi, s, last, "stop"] => (access, [y, mo, d, h, mi, s], *last, true),
            _ => return None,
        };
        let access = Access::from_segment(access)?;
        let widths = [4, 2, 2, 2, 2, 2];
        let mut parts = [0u16; 6];
        for ((part, text), width) in parts.iter_mut().zip(date).zip(widths) {
            if text.len() != width || !text.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            *part = text.parse().ok()?;
        }
        let (id, suffix) = if stop {
            (last, Suffix::Stop)
        } else if let Some(id) = last.strip_suffix(".json") {
            (id, Suffix::Status)
        } else if let Some(id) = last.strip_suffix(".txt") {
            (id, Suffix::Events)
        } else if let Some(id) = last.strip_suffix(".raw") {
            (id, Suffix::Raw)
        } else {
            return None;
        };
        Some(Self { kind, access, date: UrlDate(parts), id: RequestId::parse(id)?, suffix })
    }

    /// Parses a full URL or path (as given in `from_status_url`): the last 10 or 11 segments must be ours.
    pub fn from_url_path(path: &str) -> Option<Self> {
        let segments: Vec<&str> = path.trim_end_matches('/').split('/').collect();
        let r = segments.iter().rposition(|s| *s == "r")?;
        if r == 0 {
            return None;
        }
        Self::from_segments(segments[r - 1], &segments[r + 1..])
    }
}

impl Locator {
    /// The path of the request without suffix, e.g. `/1/r/pub/2023/06/01/11/07/06/<id>`.
    pub fn path(&self) -> String {
        let date = UrlDate::of(self.created_at).map(|d| d.0).unwrap_or([1970, 1, 1, 0, 0, 0]);
        format!(
            "/{}/r/{}/{:04}/{:02}/{:02}/{:02}/{:02}/{:02}/{}",
            self.kind.code(),
            self.access.segment(),
            date[0],
            date[1],
            date[2],
            date[3],
            date[4],
            date[5],
            self.id
        )
    }

    pub fn url(&self, base: &str, suffix: Suffix) -> String {
        let ending = match suffix {
            Suffix::Status => ".json",
            Suffix::Events => ".txt",
            Suffix::Raw => ".raw",
            Suffix::Stop => "/stop",
        };
        format!("{base}{}{ending}", self.path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed_locator() -> Locator {
        Locator {
            kind: Kind::Async,
            access: Access::Public,
            created_at: 1685638041,
            id: RequestId::parse("154dff1d-a1b1-4270-bbbc-66b9a5700a12").unwrap(),
        }
    }

    #[test]
    fn builds_the_seed_documents_url() {
        assert_eq!(
            seed_locator().url("https://offloadgpt.microdeploy.com", Suffix::Status),
            "https://offloadgpt.microdeploy.com/2/r/pub/2023/06/01/16/47/21/154dff1d-a1b1-4270-bbbc-66b9a5700a12.json"
        );
    }

    #[test]
    fn parses_every_suffix_back_to_the_same_request() {
        let loc = seed_locator();
        for suffix in [Suffix::Status, Suffix::Events, Suffix::Raw, Suffix::Stop] {
            let url = loc.url("http://h:1/base", suffix);
            let parsed = ParsedUrl::from_url_path(url.trim_start_matches("http://h:1")).unwrap();
            assert_eq!(parsed.suffix, suffix);
            assert!(parsed.matches(&loc));
        }
    }

    #[test]
    fn a_url_with_another_date_kind_or_access_does_not_match() {
        let loc = seed_locator();
        let path = loc.url("", Suffix::Status);
        for wrong in [
            path.replace("/2023/06/01/16/47/21/", "/2023/06/01/16/47/22/"),
            path.replacen("/2/r/", "/1/r/", 1),
            path.replace("/pub/", "/priv/"),
        ] {
            let parsed = ParsedUrl::from_url_path(&wrong).unwrap();
            assert!(!parsed.matches(&loc), "{wrong}");
        }
        assert!(ParsedUrl::from_url_path("/2/r/pub/23/06/01/16/47/21/x.json").is_none());
        assert!(
            ParsedUrl::from_url_path("/3/r/pub/2023/06/01/16/47/21/154dff1d-a1b1-4270-bbbc-66b9a5700a12.json")
                .is_none()
        );
    }
}
