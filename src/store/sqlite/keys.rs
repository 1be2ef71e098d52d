//! The key family: service keys (hashes only) and their usage per day and month.

use super::{SqliteStore, db_err, json_err};
use crate::domain::{KeyLimits, NodeId, ServiceKey, TokenHash, unix_now};
use crate::store::usage::{UsageOf, UsageRow, key_column, key_of_column};
use crate::store::{Admit, Charge, Conflict, KeyStore, Periods, SlotId, StoreError, Usage};
use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

const SELECT_KEY: &str = "SELECT id, name, created_at, revoked_at, limits FROM service_keys";

fn row_to_key(row: &rusqlite::Row<'_>) -> rusqlite::Result<(ServiceKey, String)> {
    Ok((
        ServiceKey {
            id: row.get(0)?,
            name: row.get(1)?,
            created_at: row.get(2)?,
            revoked_at: row.get(3)?,
            limits: KeyLimits::default(),
        },
        row.get(4)?,
    ))
}

fn with_limits((mut key, limits): (ServiceKey, String)) -> Result<ServiceKey, StoreError> {
    key.limits = serde_json::from_str(&limits).map_err(json_err)?;
    Ok(key)
}

/// A unique column of `service_keys` already holds the value: which one, by the message SQLite names it in.
fn conflict_err(e: rusqlite::Error) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, message) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
            if message.as_deref().is_some_and(|m| m.contains("service_keys.name")) {
                Conflict::KeyNameTaken.into()
            } else {
                Conflict::KeyExists.into()
            }
        }
        _ => db_err(e),
    }
}

fn usage(conn: &Connection, key_id: &str, period: &str) -> Result<u64, StoreError> {
    conn.prepare_cached("SELECT count FROM key_usage WHERE key_id = ?1 AND period = ?2")
        .and_then(|mut s| s.query_row(params![key_id, period], |r| r.get::<_, u64>(0)).optional())
        .map(Option::unwrap_or_default)
        .map_err(db_err)
}

/// Counts one request against the key's day and month in `tx`, unless one is full (then nothing is written). A
/// usage that cannot be read fails it (fail closed): it is never taken as "under quota".
fn count(tx: &Connection, key_id: &str, limits: &KeyLimits, day: &str, month: &str) -> Result<Charge, StoreError> {
    let full = |period: &str, max: Option<u64>| match max {
        Some(max) => usage(tx, key_id, period).map(|n| n >= max),
        None => Ok(false),
    };
    if full(day, limits.requests_per_day)? {
        return Ok(Charge::DayFull);
    }
    if full(month, limits.requests_per_month)? {
        return Ok(Charge::MonthFull);
    }
    for period in [day, month] {
        tx.prepare_cached(
            "INSERT INTO key_usage (key_id, period, count) VALUES (?1, ?2, 1)
             ON CONFLICT (key_id, period) DO UPDATE SET count = count + 1",
        )
        .and_then(|mut s| s.execute(params![key_id, period]))
        .map_err(db_err)?;
    }
    Ok(Charge::Counted)
}

/// The key's bucket at `now` (refilled at `rate` per second, holding at most `max(rate, 1)` tokens) less the
/// token taken, to be written back with [`put_bucket`]; `Err`: empty, the next token in this many seconds.
fn take(tx: &Connection, key_id: &str, rate: f64, now: f64) -> Result<Result<f64, f64>, StoreError> {
    let bucket: Option<(f64, f64)> = tx
        .prepare_cached("SELECT tokens, at FROM key_buckets WHERE key_id = ?1")
        .and_then(|mut s| s.query_row([key_id], |r| Ok((r.get(0)?, r.get(1)?))).optional())
        .map_err(db_err)?;
    let capacity = rate.max(1.0);
    let tokens = bucket.map_or(capacity, |(t, at)| (t + (now - at).max(0.0) * rate).min(capacity));
    if tokens < 1.0 {
        return Ok(Err((1.0 - tokens) / rate));
    }
    Ok(Ok(tokens - 1.0))
}

fn put_bucket(tx: &Connection, key_id: &str, tokens: f64, now: f64) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO key_buckets (key_id, tokens, at) VALUES (?1, ?2, ?3)
         ON CONFLICT (key_id) DO UPDATE SET tokens = excluded.tokens, at = excluded.at",
    )
    .and_then(|mut s| s.execute(params![key_id, tokens, now]))
    .map_err(db_err)?;
    Ok(())
}

#[async_trait]
impl KeyStore for SqliteStore {
    async fn create_key(&self, key: &ServiceKey, hash: TokenHash) -> Result<(), StoreError> {
        let key = key.clone();
        self.write_with(move |conn| {
            let limits = serde_json::to_string(&key.limits).map_err(json_err)?;
            conn.execute(
                "INSERT INTO service_keys (id, name, hash, created_at, revoked_at, limits) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![key.id, key.name, hash.as_bytes(), key.created_at, key.revoked_at, limits],
            )
            .map_err(conflict_err)?;
            Ok(())
        })
        .await
    }

    async fn key_by_hash(&self, hash: TokenHash) -> Result<Option<ServiceKey>, StoreError> {
        self.read(move |conn| {
            conn.prepare_cached(&format!("{SELECT_KEY} WHERE hash = ?1"))
                .and_then(|mut s| s.query_row([hash.as_bytes()], row_to_key).optional())
                .map_err(db_err)?
                .map(with_limits)
                .transpose()
        })
        .await
    }

    async fn keys(&self, periods: &Periods) -> Result<Vec<(ServiceKey, Usage)>, StoreError> {
        let periods = periods.clone();
        self.read(move |conn| {
            let rows: Vec<(ServiceKey, String)> = conn
                .prepare(&format!("{SELECT_KEY} ORDER BY created_at, name"))
                .and_then(|mut s| s.query_map([], row_to_key)?.collect())
                .map_err(db_err)?;
            rows.into_iter()
                .map(|row| {
                    let key = with_limits(row)?;
                    let today = usage(conn, &key.id, &periods.day_key())?;
                    let this_month = usage(conn, &key.id, &periods.month_key())?;
                    Ok((key, Usage { today, this_month }))
                })
                .collect()
        })
        .await
    }

    async fn revoke_key(&self, name_or_id: &str, at: i64) -> Result<bool, StoreError> {
        let name_or_id = name_or_id.to_owned();
        self.write_with(move |conn| {
            let changed = conn
                .execute(
                    "UPDATE service_keys SET revoked_at = ?2 WHERE (name = ?1 OR id = ?1) AND revoked_at IS NULL",
                    params![name_or_id, at],
                )
                .map_err(db_err)?;
            Ok(changed > 0)
        })
        .await
    }

    async fn set_limits(&self, name_or_id: &str, limits: &KeyLimits) -> Result<bool, StoreError> {
        let (name_or_id, limits) = (name_or_id.to_owned(), serde_json::to_string(limits).map_err(json_err)?);
        self.write_with(move |conn| {
            let changed = conn
                .execute(
                    "UPDATE service_keys SET limits = ?2 WHERE (name = ?1 OR id = ?1) AND revoked_at IS NULL",
                    params![name_or_id, limits],
                )
                .map_err(db_err)?;
            Ok(changed > 0)
        })
        .await
    }

    async fn usage(&self, of: UsageOf<'_>, since: &str) -> Result<Vec<UsageRow>, StoreError> {
        let (key, since) = (
            match of {
                UsageOf::All => None,
                UsageOf::Key(key) => Some(key_column(key).to_owned()),
            },
            since.to_owned(),
        );
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT key_id, model, day, requests, input_tokens, output_tokens FROM token_usage
                 WHERE day >= ?1 AND (?2 IS NULL OR key_id = ?2) ORDER BY day, key_id, model",
            )
            .and_then(|mut s| {
                s.query_map(params![since, key], |r| {
                    Ok(UsageRow {
                        key: key_of_column(r.get(0)?),
                        model: r.get(1)?,
                        day: r.get(2)?,
                        requests: r.get(3)?,
                        input_tokens: r.get(4)?,
                        output_tokens: r.get(5)?,
                    })
                })?
                .collect()
            })
            .map_err(db_err)
        })
        .await
    }

    async fn active_keys_exist(&self) -> Result<bool, StoreError> {
        self.read(|conn| {
            conn.prepare_cached("SELECT EXISTS (SELECT 1 FROM service_keys WHERE revoked_at IS NULL)")
                .and_then(|mut s| s.query_row([], |r| r.get(0)))
                .map_err(db_err)
        })
        .await
    }

    async fn charge(&self, key: &ServiceKey, periods: &Periods) -> Result<Charge, StoreError> {
        let (id, limits, day, month) = (key.id.clone(), key.limits.clone(), periods.day_key(), periods.month_key());
        // On the writer thread: the read and the increment cannot interleave with another charge of this handle.
        // The transaction takes the write lock before it reads (IMMEDIATE), so neither can they with a charge of
        // another handle on the same file: it waits its turn instead of failing on a snapshot gone stale.
        self.write_with(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_err)?;
            let charge = count(&tx, &id, &limits, &day, &month)?;
            if charge == Charge::Counted {
                tx.commit().map_err(db_err)?;
            }
            Ok(charge)
        })
        .await
    }

    async fn refund(&self, key_id: &str, periods: &Periods) -> Result<(), StoreError> {
        let (id, day, month) = (key_id.to_owned(), periods.day_key(), periods.month_key());
        self.write_with(move |conn| {
            conn.execute(
                "UPDATE key_usage SET count = MAX(count - 1, 0) WHERE key_id = ?1 AND period IN (?2, ?3)",
                params![id, day, month],
            )
            .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn admit(
        &self,
        key: &ServiceKey,
        periods: &Periods,
        node: NodeId,
        slot: SlotId,
    ) -> Result<Admit, StoreError> {
        let (key, day, month, now) = (key.clone(), periods.day_key(), periods.month_key(), unix_now());
        // On the writer thread, in one IMMEDIATE transaction: every check and what it takes happen at once.
        self.write_with(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_err)?;
            let limits = &key.limits;
            if let Some(max) = limits.max_in_flight {
                let held: u64 = tx
                    .prepare_cached("SELECT COUNT(*) FROM key_slots WHERE key_id = ?1")
                    .and_then(|mut s| s.query_row([&key.id], |r| r.get(0)))
                    .map_err(db_err)?;
                if held >= u64::from(max) {
                    return Ok(Admit::InFlightFull);
                }
            }
            let mut tokens = None;
            if let Some(rate) = limits.rate {
                match take(&tx, &key.id, rate, now)? {
                    Ok(left) => tokens = Some(left),
                    Err(wait) => return Ok(Admit::RateLimited { wait }),
                }
            }
            match count(&tx, &key.id, limits, &day, &month)? {
                Charge::Counted => {}
                Charge::DayFull => return Ok(Admit::DayFull),
                Charge::MonthFull => return Ok(Admit::MonthFull),
            }
            if let Some(tokens) = tokens {
                put_bucket(&tx, &key.id, tokens, now)?;
            }
            if limits.max_in_flight.is_some() {
                tx.prepare_cached("INSERT INTO key_slots (id, key_id, node) VALUES (?1, ?2, ?3)")
                    .and_then(|mut s| s.execute(params![&slot.0.as_bytes()[..], key.id, &node.as_bytes()[..]]))
                    .map_err(db_err)?;
            }
            tx.commit().map_err(db_err)?;
            Ok(Admit::Admitted { took_slot: limits.max_in_flight.is_some(), took_token: limits.rate.is_some() })
        })
        .await
    }

    async fn release_slot(&self, slot: SlotId) -> Result<(), StoreError> {
        self.write_with(move |conn| {
            conn.prepare_cached("DELETE FROM key_slots WHERE id = ?1")
                .and_then(|mut s| s.execute([&slot.0.as_bytes()[..]]))
                .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn return_token(&self, key: &ServiceKey) -> Result<(), StoreError> {
        let Some(rate) = key.limits.rate else { return Ok(()) };
        let id = key.id.clone();
        self.write_with(move |conn| {
            conn.prepare_cached("UPDATE key_buckets SET tokens = MIN(?2, tokens + 1) WHERE key_id = ?1")
                .and_then(|mut s| s.execute(params![id, rate.max(1.0)]))
                .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn take_token(&self, key: &ServiceKey) -> Result<Result<(), f64>, StoreError> {
        let Some(rate) = key.limits.rate else { return Ok(Ok(())) };
        let (id, now) = (key.id.clone(), unix_now());
        self.write_with(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_err)?;
            let tokens = match take(&tx, &id, rate, now)? {
                Ok(tokens) => tokens,
                Err(wait) => return Ok(Err(wait)),
            };
            put_bucket(&tx, &id, tokens, now)?;
            tx.commit().map_err(db_err)?;
            Ok(Ok(()))
        })
        .await
    }

    async fn release_orphaned_slots(&self) -> Result<usize, StoreError> {
        self.write_with(|conn| {
            conn.prepare_cached(concat!(
                "DELETE FROM key_slots
                 WHERE (node IS NULL OR NOT EXISTS (SELECT 1 FROM nodes n WHERE n.id = key_slots.node))
                   AND NOT EXISTS (SELECT 1 FROM requests WHERE requests.owner = key_slots.node AND ",
                super::unfinished!(),
                ")"
            ))
            .and_then(|mut s| s.execute([]))
            .map_err(db_err)
        })
        .await
    }
}
