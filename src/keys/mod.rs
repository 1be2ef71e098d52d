//! Service keys: who may create requests, and how many.
//!
//! When no key exists the server runs open. Otherwise every create call presents a key (`Authorization:
//! Bearer`, `X-API-Key` or `X-RapidAPI-Key`), and its limits are applied in an order that makes a refusal cost
//! nothing: an in-flight slot and a rate token are taken in memory (and given back if a later check refuses),
//! then the day and month quotas are counted in the store in one atomic step. A create that fails after that is
//! refunded.
//!
//! Rates and in-flight counts are kept per server process; quotas are kept in the store and shared.

pub mod cli;

use crate::domain::{ServiceKey, TokenHash};
use crate::store::{Charge, KeyStore, Periods, StoreError};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use time::OffsetDateTime;

/// How long the answer to "does any key exist?" is reused: a key created while the server runs takes effect
/// within this time.
const OPEN_CHECK_TTL: Duration = Duration::from_secs(1);

pub struct Gatekeeper {
    keys: Arc<dyn KeyStore>,
    open: Mutex<Option<(Instant, bool)>>,
    buckets: Mutex<HashMap<String, Bucket>>,
    in_flight: Arc<Mutex<HashMap<String, u32>>>,
}

/// Why a create call was refused.
#[derive(Debug)]
pub enum Refusal {
    /// No key presented while keys are required (401).
    Missing,
    /// A key that does not exist or was revoked (401).
    Unknown,
    /// A limit is reached (429).
    Limit {
        message: String,
        retry_after: u64,
    },
    Store(StoreError),
}

/// A call counted against a key; hand it back with [`Gatekeeper::refund`] if the create fails.
pub struct Admission {
    key_id: String,
    periods: Periods,
    took_token: bool,
    /// The key's in-flight slot, held until the request is final.
    pub slot: Option<InFlightSlot>,
}

/// One of a key's in-flight slots; freed on drop.
pub struct InFlightSlot {
    counts: Arc<Mutex<HashMap<String, u32>>>,
    key_id: String,
}

impl Drop for InFlightSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock();
        if let Some(n) = counts.get_mut(&self.key_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.key_id);
            }
        }
    }
}

/// A token bucket holding one second's worth of requests (at least one).
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refill(&mut self, rate: f64) {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * rate).min(rate.max(1.0));
        self.at = now;
    }
}

/// The current quota periods and how long until each ends.
pub fn periods_now() -> (Periods, u64, u64) {
    let now = OffsetDateTime::now_utc();
    let date = now.date();
    let periods = Periods {
        day: format!("{:04}-{:02}-{:02}", date.year(), u8::from(date.month()), date.day()),
        month: format!("{:04}-{:02}", date.year(), u8::from(date.month())),
    };
    let seconds_into_day = u64::from(now.hour()) * 3600 + u64::from(now.minute()) * 60 + u64::from(now.second());
    let to_midnight = 86_400 - seconds_into_day;
    let days_left = u64::from(date.month().length(date.year()) - date.day());
    (periods, to_midnight, to_midnight + days_left * 86_400)
}

impl Gatekeeper {
    pub fn new(keys: Arc<dyn KeyStore>) -> Self {
        Self {
            keys,
            open: Mutex::new(None),
            buckets: Mutex::new(HashMap::new()),
            in_flight: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    async fn keys_required(&self) -> Result<bool, StoreError> {
        if let Some((at, required)) = *self.open.lock()
            && at.elapsed() < OPEN_CHECK_TTL
        {
            return Ok(required);
        }
        let required = self.keys.active_keys_exist().await?;
        *self.open.lock() = Some((Instant::now(), required));
        Ok(required)
    }

    /// The calling key, or `None` when the server runs open.
    pub async fn authenticate(&self, presented: Option<&str>) -> Result<Option<ServiceKey>, Refusal> {
        if !self.keys_required().await.map_err(Refusal::Store)? {
            return Ok(None);
        }
        let presented = presented.ok_or(Refusal::Missing)?;
        match self.keys.key_by_hash(TokenHash::of(presented)).await.map_err(Refusal::Store)? {
            Some(key) if key.revoked_at.is_none() => Ok(Some(key)),
            _ => Err(Refusal::Unknown),
        }
    }

    /// Counts one create call against the key's limits. When a limit refuses it, nothing is counted.
    pub async fn admit(&self, key: &ServiceKey) -> Result<Admission, Refusal> {
        let limits = &key.limits;
        let slot = match limits.max_in_flight {
            Some(max) => {
                let mut counts = self.in_flight.lock();
                let n = counts.entry(key.id.clone()).or_insert(0);
                if *n >= max {
                    return Err(Refusal::Limit {
                        message: format!(
                            "This key may have at most {max} requests running at once (its max-in-flight limit); retry when one finishes."
                        ),
                        retry_after: 1,
                    });
                }
                *n += 1;
                Some(InFlightSlot { counts: self.in_flight.clone(), key_id: key.id.clone() })
            }
            None => None,
        };
        let took_token = match limits.rate {
            Some(rate) => {
                let mut buckets = self.buckets.lock();
                let bucket = buckets
                    .entry(key.id.clone())
                    .or_insert_with(|| Bucket { tokens: rate.max(1.0), at: Instant::now() });
                bucket.refill(rate);
                if bucket.tokens < 1.0 {
                    let wait = ((1.0 - bucket.tokens) / rate).ceil().max(1.0) as u64;
                    return Err(Refusal::Limit {
                        message: format!(
                            "This key is limited to {rate} requests per second (its rate limit); retry shortly."
                        ),
                        retry_after: wait,
                    });
                }
                bucket.tokens -= 1.0;
                true
            }
            None => false,
        };
        let (periods, to_midnight, to_month_end) = periods_now();
        let refusal = match self.keys.charge(key, &periods).await {
            Ok(Charge::Counted) => None,
            Ok(Charge::DayFull) => Some(Refusal::Limit {
                message: format!(
                    "This key's quota of {} requests per day is used up; it resets at midnight UTC.",
                    limits.requests_per_day.unwrap_or_default()
                ),
                retry_after: to_midnight,
            }),
            Ok(Charge::MonthFull) => Some(Refusal::Limit {
                message: format!(
                    "This key's quota of {} requests per month is used up; it resets on the first of next month (UTC).",
                    limits.requests_per_month.unwrap_or_default()
                ),
                retry_after: to_month_end,
            }),
            Err(e) => Some(Refusal::Store(e)),
        };
        if let Some(refusal) = refusal {
            if took_token {
                self.give_back_token(&key.id, limits.rate.unwrap_or(1.0));
            }
            return Err(refusal);
        }
        Ok(Admission { key_id: key.id.clone(), periods, took_token, slot })
    }

    fn give_back_token(&self, key_id: &str, rate: f64) {
        if let Some(bucket) = self.buckets.lock().get_mut(key_id) {
            bucket.tokens = (bucket.tokens + 1.0).min(rate.max(1.0));
        }
    }

    /// Takes back a call whose create failed after it was admitted.
    pub async fn refund(&self, admission: Admission, key: &ServiceKey) {
        if admission.took_token {
            self.give_back_token(&admission.key_id, key.limits.rate.unwrap_or(1.0));
        }
        if let Err(e) = self.keys.refund(&admission.key_id, &admission.periods).await {
            tracing::error!(key = %admission.key_id, error = %e, "could not refund a quota count");
        }
    }
}
