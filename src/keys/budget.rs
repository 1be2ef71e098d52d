//! Token budgets: a key's tokens per day and per month (input plus output), read from the usage rows of the store
//! ([`crate::store::usage`]), which every node of a cluster adds to. A key that has used a budget is refused until
//! the period ends; requests already running are not cut, so a budget can be overshot by the tokens of the key's
//! requests in flight when it was crossed.

use super::Refusal;
use crate::domain::ServiceKey;
use crate::store::usage::{UsageOf, total_since};
use crate::store::{KeyStore, Periods};

/// Refuses a call of `key` if its day's or month's tokens have reached its budget. `resets`: the seconds to the
/// next UTC midnight and to the first of next month.
pub(super) async fn check(
    keys: &dyn KeyStore,
    key: &ServiceKey,
    periods: &Periods,
    (to_midnight, to_month_end): (u64, u64),
) -> Result<(), Refusal> {
    let rows = keys.usage(UsageOf::Key(Some(&key.id)), &periods.month).await.map_err(Refusal::Store)?;
    let limits = &key.limits;
    let refuse = |budget: u64, used: u64, period: &str, resets: &str, retry_after: u64| {
        crate::metrics::create_refused("token_quota");
        Err(Refusal::Tokens {
            message: format!(
                "This key's budget of {budget} tokens per {period} is used up ({used} used); it resets at {} ({resets}).",
                reset_at(retry_after)
            ),
            retry_after,
        })
    };
    if let Some(budget) = limits.tokens_per_day {
        let used = total_since(&rows, &periods.day);
        if used >= budget {
            return refuse(budget, used, "day", "midnight UTC", to_midnight);
        }
    }
    if let Some(budget) = limits.tokens_per_month {
        let used = total_since(&rows, &periods.month);
        if used >= budget {
            return refuse(budget, used, "month", "the first of next month, UTC", to_month_end);
        }
    }
    Ok(())
}

/// The time `seconds` from now, rounded to the minute (the periods end on whole minutes), as RFC 3339 in UTC.
fn reset_at(seconds: u64) -> String {
    let at = time::OffsetDateTime::now_utc() + time::Duration::seconds(i64::try_from(seconds).unwrap_or(0));
    let minutes = (at.unix_timestamp() + 30).div_euclid(60) * 60;
    let at = time::OffsetDateTime::from_unix_timestamp(minutes).unwrap_or(at);
    let (date, clock) = (at.date(), at.time());
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:00Z",
        date.year(),
        u8::from(date.month()),
        date.day(),
        clock.hour(),
        clock.minute()
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn resets_fall_on_whole_minutes() {
        let at = super::reset_at(3600);
        assert!(at.ends_with(":00Z") && at.len() == 20, "{at}");
    }
}
