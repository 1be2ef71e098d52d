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
        // Exactly `1` or `2`: `01` or `+1` would be a second URL for the same request.
        let kind = match kind {
            "1" => Kind::Stream,
            "2" => Kind::Async,
            _ => return None,
        };
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
    pub fn url(&self, base: &str, suffix: Suffix) -> String {
        let ending = match suffix {
            Suffix::Status => ".json",
            Suffix::Events => ".txt",
            Suffix::Raw => ".raw",
            Suffix::Stop => "/stop",
        };
        let mut url = String::with_capacity(base.len() + PATH_LEN + ending.len());
        url.push_str(base);
        self.push_path(&mut url);
        url.push_str(ending);
        url
    }

    /// Writes the path of the request without suffix, e.g. `/1/r/pub/2023/06/01/11/07/06/<id>`, without `fmt`:
    /// every create answer and status document carries three or four of these URLs, and `format!` made them a
    /// tenth of a status read's instructions (measured; docs/DECISIONS.md).
    fn push_path(&self, out: &mut String) {
        let [year, month, day, hour, minute, second] =
            UrlDate::of(self.created_at).map(|d| d.0).unwrap_or([1970, 1, 1, 0, 0, 0]);
        let mut number = itoa::Buffer::new();
        out.push('/');
        out.push_str(number.format(self.kind.code()));
        out.push_str("/r/");
        out.push_str(self.access.segment());
        out.push('/');
        push_padded(out, number.format(year), 4);
        for part in [month, day, hour, minute, second] {
            out.push('/');
            push_padded(out, number.format(part), 2);
        }
        out.push('/');
        let mut id = [0u8; uuid::fmt::Hyphenated::LENGTH];
        out.push_str(uuid::Uuid::from_bytes(*self.id.as_bytes()).hyphenated().encode_lower(&mut id));
    }
}

/// The length of a path: `/1/r/priv/2023/06/01/11/07/06/` and a hyphenated UUID.
const PATH_LEN: usize = 30 + uuid::fmt::Hyphenated::LENGTH;

/// `digits` zero-padded to `width` (as `{:0width$}` would).
fn push_padded(out: &mut String, digits: &str, width: usize) {
    out.extend(std::iter::repeat_n('0', width.saturating_sub(digits.len())));
    out.push_str(digits);
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
    fn writes_the_path_as_format_would() {
        for created_at in [0, 1, 1685638041, 4102444799, -2208988800, -62135596800, 253402300799, i64::MAX] {
            for (kind, access) in [(Kind::Async, Access::Public), (Kind::Stream, Access::Private)] {
                let loc = Locator { kind, access, created_at, ..seed_locator() };
                let d = UrlDate::of(created_at).map(|d| d.0).unwrap_or([1970, 1, 1, 0, 0, 0]);
                let expected = format!(
                    "b/{}/r/{}/{:04}/{:02}/{:02}/{:02}/{:02}/{:02}/{}/stop",
                    kind.code(),
                    access.segment(),
                    d[0],
                    d[1],
                    d[2],
                    d[3],
                    d[4],
                    d[5],
                    loc.id
                );
                assert_eq!(loc.url("b", Suffix::Stop), expected);
            }
        }
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
    fn a_kind_written_another_way_is_not_a_url() {
        // Found by `a_url_that_parses_is_written_the_one_way_we_write_it`: `01` parsed as kind 1.
        for kind in ["01", "+1", "002", "1 "] {
            let path = format!("/{kind}/r/pub/2023/06/01/16/47/21/154dff1d-a1b1-4270-bbbc-66b9a5700a12.json");
            assert!(ParsedUrl::from_url_path(&path).is_none(), "{path}");
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

/// Properties over generated URLs: parsing never panics, every URL a locator builds parses back to it, and a
/// URL that parses is written the one way this server writes it.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Any instant from 1970 to the end of year 9999, the years a URL can hold.
    fn locator() -> impl Strategy<Value = Locator> {
        (any::<bool>(), any::<bool>(), 0i64..=253_402_300_799, any::<[u8; 16]>()).prop_map(
            |(stream, private, created_at, id)| Locator {
                kind: if stream { Kind::Stream } else { Kind::Async },
                access: if private { Access::Private } else { Access::Public },
                created_at,
                id: RequestId::from_bytes(id),
            },
        )
    }

    fn suffix() -> impl Strategy<Value = Suffix> {
        prop::sample::select(&[Suffix::Status, Suffix::Events, Suffix::Raw, Suffix::Stop][..])
    }

    /// Segments that are often almost right: the pieces of real URLs, their near misses, and noise.
    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(
                &["1", "2", "3", "01", "+1", "r", "pub", "priv", "stop", "2023", "06", "6", "+6", "٦", "00", "99", "",]
                    [..]
            )
            .prop_map(str::to_owned),
            "[0-9]{1,5}",
            id_with_ending(),
            ".{0,40}",
        ]
    }

    /// A date segment of `width` digits, or now and then a near miss.
    fn date_part(width: usize) -> impl Strategy<Value = String> {
        prop_oneof![
            8 => prop::collection::vec(prop::char::range('0', '9'), width).prop_map(String::from_iter),
            1 => "[0-9]{1,5}",
            1 => prop::sample::select(&["+1", "-1", " 12", "1e1", "٦٦", "0x1"][..]).prop_map(str::to_owned),
        ]
    }

    fn id_with_ending() -> impl Strategy<Value = String> {
        (any::<[u8; 16]>(), prop::sample::select(&["", ".json", ".txt", ".raw", ".JSON", ".json.txt"][..]))
            .prop_map(|(id, end)| format!("{}{end}", RequestId::from_bytes(id)))
    }

    /// How this server writes a parsed URL.
    fn written(p: &ParsedUrl) -> String {
        let [y, mo, d, h, mi, s] = p.date.0;
        let ending = match p.suffix {
            Suffix::Status => ".json",
            Suffix::Events => ".txt",
            Suffix::Raw => ".raw",
            Suffix::Stop => "/stop",
        };
        format!(
            "{}/r/{}/{y:04}/{mo:02}/{d:02}/{h:02}/{mi:02}/{s:02}/{}{ending}",
            p.kind.code(),
            p.access.segment(),
            p.id
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_segments_give_a_url_or_none(kind in segment(), rest in prop::collection::vec(segment(), 0..12)) {
            let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
            let _ = ParsedUrl::from_segments(&kind, &rest);
        }

        #[test]
        fn any_path_gives_a_url_or_none(parts in prop::collection::vec(segment(), 0..14)) {
            let _ = ParsedUrl::from_url_path(&parts.join("/"));
        }

        #[test]
        fn a_url_that_parses_is_written_the_one_way_we_write_it(
            kind in prop::sample::select(&["1", "2", "3", "01", "+1", " 1", "1 "][..]),
            access in prop::sample::select(&["pub", "priv", "PUB", "public", ""][..]),
            date in [date_part(4), date_part(2), date_part(2), date_part(2), date_part(2), date_part(2)],
            last in prop_oneof![
                4 => id_with_ending(),
                1 => segment(),
            ],
            stop in any::<bool>(),
        ) {
            let mut rest: Vec<&str> = std::iter::once(access).chain(date.iter().map(String::as_str)).collect();
            rest.push(&last);
            if stop {
                rest.push("stop");
            }
            if let Some(parsed) = ParsedUrl::from_segments(kind, &rest) {
                prop_assert_eq!(written(&parsed), format!("{kind}/r/{}", rest.join("/")));
            }
        }

        #[test]
        fn every_url_of_a_locator_parses_back_to_it(
            loc in locator(),
            suffix in suffix(),
            base in prop::sample::select(&["", "http://127.0.0.1:8080", "https://h.example/r/base", "/r"][..]),
        ) {
            let url = loc.url(base, suffix);
            let parsed = ParsedUrl::from_url_path(&url);
            prop_assert!(parsed.is_some(), "{} does not parse", url);
            let Some(parsed) = parsed else { return Ok(()) };
            prop_assert_eq!(parsed.suffix, suffix);
            prop_assert_eq!((parsed.kind, parsed.access, parsed.id), (loc.kind, loc.access, loc.id));
            prop_assert!(parsed.matches(&loc), "{} does not match {:?}", url, loc);
        }
    }
}
