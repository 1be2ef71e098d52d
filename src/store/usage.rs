//! Token usage per service key, model and UTC day, kept in the store: every final status adds its request's tokens
//! to one row (an upsert that adds, in the transaction of the final status, and only when that status applies), so
//! the sums are exact across the nodes of a cluster and a request is counted once.

use crate::document::RequestMeta;
use crate::document::usage::Tokens;

/// The longest model name kept (in bytes, cut at a character boundary): callers name models, and a name is part
/// of a row's key.
pub const MODEL_MAX_BYTES: usize = 128;

/// What one finished request adds to its (key, model, day) row: one request and its tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tally {
    /// The id of the service key that created the request; `None` on an open server.
    pub key: Option<String>,
    /// The model the request named (its `model` parameter), cut at [`MODEL_MAX_BYTES`].
    pub model: String,
    /// The UTC day the request ended, `YYYY-MM-DD`.
    pub day: String,
    pub input: u64,
    pub output: u64,
}

impl Tally {
    /// The tally of a request ending at `at` (unix seconds) with the tokens its upstream reported (none: zero).
    pub fn of(meta: &RequestMeta, tokens: Option<&Tokens>, at: f64) -> Self {
        #[derive(serde::Deserialize)]
        struct Named<'a> {
            #[serde(borrow, default)]
            model: Option<std::borrow::Cow<'a, str>>,
        }
        let named = serde_json::from_str::<Named<'_>>(meta.parameters.get()).ok().and_then(|n| n.model);
        let model = match (named, tokens) {
            (Some(model), _) => model.into_owned(),
            (None, Some(tokens)) => tokens.model.clone(),
            (None, None) => String::new(),
        };
        Self {
            key: meta.key.clone(),
            model: cut(model),
            day: day_of(at),
            input: tokens.map_or(0, |t| t.input),
            output: tokens.map_or(0, |t| t.output),
        }
    }
}

fn cut(mut model: String) -> String {
    if model.len() > MODEL_MAX_BYTES {
        let mut end = MODEL_MAX_BYTES;
        while !model.is_char_boundary(end) {
            end -= 1;
        }
        model.truncate(end);
    }
    model
}

/// The UTC day of a unix time, `YYYY-MM-DD`.
pub fn day_of(at: f64) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp(at.floor() as i64).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let date = at.date();
    format!("{:04}-{:02}-{:02}", date.year(), u8::from(date.month()), date.day())
}

/// One stored row: a key's requests and tokens of one model on one day.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UsageRow {
    /// `None`: requests made without a key (an open server).
    pub key: Option<String>,
    pub model: String,
    pub day: String,
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// Whose usage [`crate::store::KeyStore::usage`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageOf<'a> {
    /// Every key's, and that of requests without a key.
    All,
    /// One key's (`None`: the requests without a key).
    Key(Option<&'a str>),
}

/// How a key stored in a row's key column: the requests without a key under the empty string (a key id is never
/// empty), so that the column can be part of the primary key.
pub fn key_column(key: Option<&str>) -> &str {
    key.unwrap_or("")
}

/// The key of a row as read back.
pub fn key_of_column(column: String) -> Option<String> {
    (!column.is_empty()).then_some(column)
}

/// The total tokens (input plus output) of `rows` since `since` (a day, `YYYY-MM-DD`, or a month, `YYYY-MM`:
/// compared as text, so a month counts all of its days).
pub fn total_since(rows: &[UsageRow], since: &str) -> u64 {
    rows.iter()
        .filter(|r| r.day.as_str() >= since)
        .map(|r| r.input_tokens.saturating_add(r.output_tokens))
        .fold(0, u64::saturating_add)
}

/// A field usage is grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum By {
    Key,
    Model,
    Day,
}

impl By {
    /// The grouping named by `values` (`key`, `model`, `day`; each value may be a comma-separated list, e.g.
    /// `key,model`). Nothing named: all three, every stored row as it is.
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a str>) -> Result<Vec<By>, String> {
        let mut by = Vec::new();
        for name in values.into_iter().flat_map(|v| v.split(',')) {
            let field = match name {
                "key" => By::Key,
                "model" => By::Model,
                "day" => By::Day,
                other => return Err(format!("cannot group by {other:?}: use key, model or day")),
            };
            if !by.contains(&field) {
                by.push(field);
            }
        }
        if by.is_empty() {
            by = vec![By::Key, By::Model, By::Day];
        }
        by.sort();
        Ok(by)
    }
}

/// The longest `since` in days (27 years: four digits).
const SINCE_MAX_DAYS: u32 = 9999;

/// The first UTC day counted for `since`: `Nd`, the last N days with today (`1d`: today only), or a day
/// `YYYY-MM-DD`; `today` is the current UTC day.
pub fn since_day(since: &str, today: time::Date) -> Result<String, String> {
    let bad = || {
        format!(
            "{since:?} is not a period: give a number of days such as 7d (today and the 6 before), or a day such as 2026-01-31"
        )
    };
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    if let Some(days) = since.strip_suffix('d') {
        if days.starts_with('0') || !(1..=4).any(|n| digits(days, n)) {
            return Err(bad());
        }
        let days: u32 = days.parse().map_err(|_| bad())?;
        if !(1..=SINCE_MAX_DAYS).contains(&days) {
            return Err(format!("since must be 1d to {SINCE_MAX_DAYS}d"));
        }
        let first = today - time::Duration::days(i64::from(days - 1));
        return Ok(format!("{:04}-{:02}-{:02}", first.year(), u8::from(first.month()), first.day()));
    }
    let shape: Vec<&str> = since.split('-').collect();
    if !matches!(shape.as_slice(), [y, m, d] if digits(y, 4) && digits(m, 2) && digits(d, 2)) {
        return Err(bad());
    }
    let mut parts = since.splitn(3, '-').map(str::parse::<u16>);
    let (Some(Ok(year)), Some(Ok(month)), Some(Ok(day))) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad());
    };
    let month = u8::try_from(month).ok().and_then(|m| time::Month::try_from(m).ok()).ok_or_else(bad)?;
    let date = time::Date::from_calendar_date(i32::from(year), month, u8::try_from(day).map_err(|_| bad())?)
        .map_err(|_| bad())?;
    Ok(format!("{:04}-{:02}-{:02}", date.year(), u8::from(date.month()), date.day()))
}

/// Usage summed over a group: the grouping's fields (absent when not grouped by), then the sums.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Grouped {
    /// `Some(None)`: the requests without a key (`null`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub day: Option<String>,
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// The rows summed per group of `by`, ordered by key (no key first), model and day.
pub fn group(rows: &[UsageRow], by: &[By]) -> Vec<Grouped> {
    let mut groups: std::collections::BTreeMap<_, Grouped> = std::collections::BTreeMap::new();
    for row in rows {
        let key = by.contains(&By::Key).then(|| row.key.clone());
        let model = by.contains(&By::Model).then(|| row.model.clone());
        let day = by.contains(&By::Day).then(|| row.day.clone());
        let group = groups.entry((key.clone(), model.clone(), day.clone())).or_insert(Grouped {
            key,
            model,
            day,
            requests: 0,
            input_tokens: 0,
            output_tokens: 0,
        });
        group.requests = group.requests.saturating_add(row.requests);
        group.input_tokens = group.input_tokens.saturating_add(row.input_tokens);
        group.output_tokens = group.output_tokens.saturating_add(row.output_tokens);
    }
    groups.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_and_cut_models() {
        assert_eq!(day_of(1_700_000_000.5), "2023-11-14");
        assert_eq!(day_of(0.0), "1970-01-01");
        let long = "é".repeat(100);
        let cut = cut(long);
        assert!(cut.len() <= MODEL_MAX_BYTES && cut.chars().all(|c| c == 'é'));
    }

    #[test]
    fn totals_count_from_a_day_or_a_month() {
        let row = |day: &str, input, output| UsageRow {
            key: None,
            model: "m".into(),
            day: day.into(),
            requests: 1,
            input_tokens: input,
            output_tokens: output,
        };
        let rows = [row("2026-10-31", 100, 100), row("2026-11-01", 1, 2), row("2026-11-05", 3, 4)];
        assert_eq!(total_since(&rows, "2026-11"), 10);
        assert_eq!(total_since(&rows, "2026-11-05"), 7);
        assert_eq!(total_since(&rows, "2026-10"), 210);
        let by_model = group(&rows, &By::parse(["model"]).unwrap());
        assert_eq!(by_model.len(), 1);
        assert_eq!((by_model[0].requests, by_model[0].input_tokens, by_model[0].output_tokens), (3, 104, 106));
        let json = serde_json::to_value(&group(&rows, &By::parse(["key,day"]).unwrap())[0]).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"key": null, "day": "2026-10-31", "requests": 1, "input_tokens": 100, "output_tokens": 100})
        );
    }

    #[test]
    fn groupings_and_periods_are_parsed() {
        assert_eq!(By::parse([]).unwrap(), [By::Key, By::Model, By::Day]);
        assert_eq!(By::parse(["day", "key,model"]).unwrap(), [By::Key, By::Model, By::Day]);
        assert!(By::parse(["colour"]).is_err());
        assert!(By::parse([""]).is_err() && By::parse(["key,"]).is_err() && By::parse([" key"]).is_err());
        let today = time::Date::from_calendar_date(2026, time::Month::March, 2).unwrap();
        assert_eq!(since_day("1d", today).unwrap(), "2026-03-02");
        assert_eq!(since_day("7d", today).unwrap(), "2026-02-24");
        assert_eq!(since_day("2026-01-05", today).unwrap(), "2026-01-05");
        for bad in ["0d", "d", "7", "07d", "+7d", "2026-02-30", "2026-13-01", "2026-1-05", "x-y-z", "10000d"] {
            assert!(since_day(bad, today).is_err(), "{bad}");
        }
    }
}
