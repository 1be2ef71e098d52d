//! Service keys: who may create requests, and how many.
//!
//! When no key exists the server runs open. Otherwise every create call presents a key (`Authorization:
//! Bearer`, `X-API-Key` or `X-RapidAPI-Key`), and all of its limits (in-flight slots, rate, day and month quotas)
//! are applied by the store in one atomic step ([`KeyStore::admit`]) that takes nothing when a limit refuses. A
//! create that fails after that is refunded.
//!
//! Everything is kept in the store, so every limit is exact across all nodes of a cluster, as on one node.

mod budget;

use crate::domain::{NodeId, ServiceKey, TokenHash};
use crate::store::usage::{UsageOf, UsageRow};
use crate::store::{Admit, KeyStore, Periods, SlotId, StoreError};
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::{Duration, Instant};
use time::OffsetDateTime;

pub struct Gatekeeper {
    keys: Arc<dyn KeyStore>,
    /// This node: the holder of the in-flight slots it takes.
    node: NodeId,
    /// How long the answer to "does any key exist?" is reused (`--key-cache-ttl`): the first key created, or the
    /// last one revoked, while the server runs takes effect within this time. Zero asks the store every time.
    open_check_ttl: Duration,
    open: Mutex<Option<(Instant, bool)>>,
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
    /// A token budget is used up (429 `token_quota_exceeded`).
    Tokens {
        message: String,
        retry_after: u64,
    },
    Store(StoreError),
}

impl Refusal {
    /// Why, as the `reason` label of `offload_create_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Missing | Refusal::Unknown => "key",
            Refusal::Limit { .. } => "rate",
            Refusal::Tokens { .. } => "token_quota",
            Refusal::Store(_) => "store",
        }
    }
}

/// A call counted against a key; hand it back with [`Gatekeeper::refund`] if the create fails.
pub struct Admission {
    key_id: String,
    periods: Periods,
    took_token: bool,
    /// The key's in-flight slot, held until the request is final.
    pub slot: Option<InFlightSlot>,
}

/// One of a key's in-flight slots, held in the store (so that the limit holds across nodes) until
/// [`InFlightSlot::release`] gives it back. A slot that is dropped without being released (a panic on the way) is given
/// back by a task of its own; one whose node dies is given back by the node that notices.
pub struct InFlightSlot {
    keys: Arc<dyn KeyStore>,
    id: Option<SlotId>,
}

impl InFlightSlot {
    /// Retries for as long as the store refuses (a database outage of minutes is routine): a slot given up on
    /// would hold the key's limit down until the node restarts.
    async fn give_back(keys: &dyn KeyStore, id: SlotId) {
        let mut backoff = crate::backoff::Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        loop {
            match keys.release_slot(id).await {
                Ok(()) => return,
                Err(e) => {
                    let delay = backoff.next_delay();
                    let attempt = backoff.failures();
                    tracing::error!(error = %e, attempt, "could not give back an in-flight slot; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

impl InFlightSlot {
    /// Gives the slot back (retrying while the store refuses).
    pub async fn release(mut self) {
        if let Some(id) = self.id.take() {
            Self::give_back(&*self.keys, id).await;
        }
    }
}

impl Drop for InFlightSlot {
    fn drop(&mut self) {
        if let Some(id) = self.id.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let keys = self.keys.clone();
            runtime.spawn(async move { Self::give_back(&*keys, id).await });
        }
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

/// How long the check whether any key exists may wait for the store before the last answer is used.
const OPEN_CHECK_WITHIN: Duration = Duration::from_secs(1);

impl Gatekeeper {
    pub fn new(keys: Arc<dyn KeyStore>, node: NodeId, open_check_ttl: Duration) -> Self {
        Self { keys, node, open_check_ttl, open: Mutex::new(None) }
    }

    async fn keys_required(&self) -> Result<bool, StoreError> {
        if let Some((at, required)) = *self.open.lock()
            && at.elapsed() < self.open_check_ttl
        {
            return Ok(required);
        }
        let required = self.keys.active_keys_exist().await?;
        *self.open.lock() = Some((Instant::now(), required));
        Ok(required)
    }

    /// Whether the server runs open right now (no key exists). When the store cannot tell, its last answer, or
    /// open if it never gave one: the open server's protections then apply, which costs a keyed server at most a
    /// refused unknown `Host` while its store is out.
    /// The lookup is bounded by [`OPEN_CHECK_WITHIN`]: it runs before every call.
    pub async fn is_open(&self) -> bool {
        match tokio::time::timeout(OPEN_CHECK_WITHIN, self.keys_required()).await {
            Ok(Ok(required)) => !required,
            Ok(Err(_)) | Err(_) => self.was_open(),
        }
    }

    /// The last answer of [`Self::is_open`] without asking the store (open if there never was one).
    pub fn was_open(&self) -> bool {
        self.open.lock().is_none_or(|(_, required)| !required)
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

    /// Counts one create call against the key's limits, in the store, in one step: exact across nodes. When a
    /// limit refuses it, nothing is counted.
    pub async fn admit(&self, key: &ServiceKey) -> Result<Admission, Refusal> {
        let limits = &key.limits;
        let (periods, to_midnight, to_month_end) = periods_now();
        if limits.tokens_per_day.is_some() || limits.tokens_per_month.is_some() {
            budget::check(&*self.keys, key, &periods, (to_midnight, to_month_end)).await?;
        }
        let slot = SlotId::generate();
        let outcome = self.keys.admit(key, &periods, self.node, slot).await.map_err(Refusal::Store)?;
        if let Some(reason) = outcome.refusal_reason() {
            crate::metrics::create_refused(reason);
        }
        let refusal = |message: String, retry_after: u64| Err(Refusal::Limit { message, retry_after });
        match outcome {
            Admit::Admitted { took_slot, took_token } => Ok(Admission {
                key_id: key.id.clone(),
                periods,
                took_token,
                slot: took_slot.then(|| InFlightSlot { keys: self.keys.clone(), id: Some(slot) }),
            }),
            Admit::InFlightFull => refusal(
                format!(
                    "This key may have at most {} requests running at once (its max-in-flight limit); retry when one finishes.",
                    limits.max_in_flight.unwrap_or_default()
                ),
                1,
            ),
            Admit::RateLimited { wait } => refusal(
                format!(
                    "This key is limited to {} requests per second (its rate limit); retry shortly.",
                    limits.rate.unwrap_or_default()
                ),
                wait.ceil().max(1.0) as u64,
            ),
            Admit::DayFull => refusal(
                format!(
                    "This key's quota of {} requests per day is used up; it resets at midnight UTC.",
                    limits.requests_per_day.unwrap_or_default()
                ),
                to_midnight,
            ),
            Admit::MonthFull => refusal(
                format!(
                    "This key's quota of {} requests per month is used up; it resets on the first of next month (UTC).",
                    limits.requests_per_month.unwrap_or_default()
                ),
                to_month_end,
            ),
        }
    }

    /// Counts a call that is no request (`GET /v1/models`) against the key's rate, and only that: a burst of such
    /// calls is paced like creates, and shares their bucket, but takes no in-flight slot and no quota.
    pub async fn pace(&self, key: &ServiceKey) -> Result<(), Refusal> {
        match self.keys.take_token(key).await.map_err(Refusal::Store)? {
            Ok(()) => Ok(()),
            Err(wait) => Err(Refusal::Limit {
                message: format!(
                    "This key is limited to {} calls per second (its rate limit, shared by creates and GET /v1/models); retry shortly.",
                    key.limits.rate.unwrap_or_default()
                ),
                retry_after: wait.ceil().max(1.0) as u64,
            }),
        }
    }

    /// The usage rows of `of` from the day `since` on ([`KeyStore::usage`]).
    pub async fn usage(&self, of: UsageOf<'_>, since: &str) -> Result<Vec<UsageRow>, StoreError> {
        self.keys.usage(of, since).await
    }

    /// Takes back a call whose create failed after it was admitted.
    pub async fn refund(&self, admission: Admission, key: &ServiceKey) {
        if admission.took_token
            && let Err(e) = self.keys.return_token(key).await
        {
            tracing::error!(key = %admission.key_id, error = %e, "could not give back a rate token");
        }
        if let Some(slot) = admission.slot {
            slot.release().await;
        }
        if let Err(e) = self.keys.refund(&admission.key_id, &admission.periods).await {
            tracing::error!(key = %admission.key_id, error = %e, "could not refund a quota count");
        }
    }
}
