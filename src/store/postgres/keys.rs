//! The key family: service keys (hashes only) and their usage per day and month. Charging and refunding run in
//! the functions `offload_charge` and `offload_refund` of the schema (one round trip, one lock per key).

use super::{PostgresStore, pg_err};
use crate::domain::{KeyLimits, NodeId, ServiceKey, TokenHash};
use crate::store::columns::json_err;
use crate::store::usage::{UsageOf, UsageRow, key_column, key_of_column};
use crate::store::{Admit, Charge, Conflict, KeyStore, Periods, SlotId, StoreError, Usage};
use async_trait::async_trait;
use tokio_postgres::error::SqlState;

const SELECT_KEY: &str = "SELECT id, name, created_at, revoked_at, limits FROM service_keys";

fn row_to_key(row: &tokio_postgres::Row) -> Result<ServiceKey, StoreError> {
    let limits: &str = row.try_get(4).map_err(pg_err)?;
    Ok(ServiceKey {
        id: row.try_get(0).map_err(pg_err)?,
        name: row.try_get(1).map_err(pg_err)?,
        created_at: row.try_get(2).map_err(pg_err)?,
        revoked_at: row.try_get(3).map_err(pg_err)?,
        limits: serde_json::from_str(limits).map_err(json_err)?,
    })
}

/// A count as stored back as a number of requests (never negative: refunds stop at 0).
fn count(row: &tokio_postgres::Row, i: usize) -> Result<u64, StoreError> {
    let n: i64 = row.try_get(i).map_err(pg_err)?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// A limit as the functions take it; past `i64::MAX` (never reached) it is as good as none.
fn limit(max: Option<u64>) -> Option<i64> {
    max.and_then(|m| i64::try_from(m).ok())
}

#[async_trait]
impl KeyStore for PostgresStore {
    async fn create_key(&self, key: &ServiceKey, hash: TokenHash) -> Result<(), StoreError> {
        let limits = serde_json::to_string(&key.limits).map_err(json_err)?;
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "INSERT INTO service_keys (id, name, hash, created_at, revoked_at, limits) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .await
            .map_err(pg_err)?;
        let hash = &hash.as_bytes()[..];
        let inserted =
            client.execute(&stmt, &[&key.id, &key.name, &hash, &key.created_at, &key.revoked_at, &limits]).await;
        match inserted {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                // PostgreSQL names the first unique index that failed, and the id's comes first: the name is
                // what a person chose, so when it is taken that is the conflict to report.
                let named = client
                    .query_one("SELECT EXISTS (SELECT 1 FROM service_keys WHERE name = $1)", &[&key.name])
                    .await
                    .map_err(pg_err)?
                    .try_get(0)
                    .map_err(pg_err)?;
                Err(if named { Conflict::KeyNameTaken } else { Conflict::KeyExists }.into())
            }
            Err(e) => Err(pg_err(e)),
        }
    }

    async fn key_by_hash(&self, hash: TokenHash) -> Result<Option<ServiceKey>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(&format!("{SELECT_KEY} WHERE hash = $1")).await.map_err(pg_err)?;
        let hash = &hash.as_bytes()[..];
        let row = client.query_opt(&stmt, &[&hash]).await.map_err(pg_err)?;
        row.as_ref().map(row_to_key).transpose()
    }

    async fn keys(&self, periods: &Periods) -> Result<Vec<(ServiceKey, Usage)>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT k.id, k.name, k.created_at, k.revoked_at, k.limits, COALESCE(d.count, 0), COALESCE(m.count, 0)
                 FROM service_keys k
                 LEFT JOIN key_usage d ON d.key_id = k.id AND d.period = $1
                 LEFT JOIN key_usage m ON m.key_id = k.id AND m.period = $2
                 ORDER BY k.created_at, k.name",
            )
            .await
            .map_err(pg_err)?;
        let rows = client.query(&stmt, &[&periods.day_key(), &periods.month_key()]).await.map_err(pg_err)?;
        rows.iter()
            .map(|row| Ok((row_to_key(row)?, Usage { today: count(row, 5)?, this_month: count(row, 6)? })))
            .collect()
    }

    async fn revoke_key(&self, name_or_id: &str, at: i64) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "UPDATE service_keys SET revoked_at = $2 WHERE (name = $1 OR id = $1) AND revoked_at IS NULL",
            )
            .await
            .map_err(pg_err)?;
        Ok(client.execute(&stmt, &[&name_or_id, &at]).await.map_err(pg_err)? > 0)
    }

    async fn set_limits(&self, name_or_id: &str, limits: &KeyLimits) -> Result<bool, StoreError> {
        let limits = serde_json::to_string(limits).map_err(json_err)?;
        let client = self.client().await?;
        let stmt = client
            .prepare_cached("UPDATE service_keys SET limits = $2 WHERE (name = $1 OR id = $1) AND revoked_at IS NULL")
            .await
            .map_err(pg_err)?;
        Ok(client.execute(&stmt, &[&name_or_id, &limits]).await.map_err(pg_err)? > 0)
    }

    async fn usage(&self, of: UsageOf<'_>, since: &str) -> Result<Vec<UsageRow>, StoreError> {
        let key = match of {
            UsageOf::All => None,
            UsageOf::Key(key) => Some(key_column(key)),
        };
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT key_id, model, day, requests, input_tokens, output_tokens FROM token_usage
                 WHERE day COLLATE \"C\" >= $1 AND ($2::text IS NULL OR key_id = $2)
                 ORDER BY day COLLATE \"C\", key_id COLLATE \"C\", model COLLATE \"C\"",
            )
            .await
            .map_err(pg_err)?;
        let rows = client.query(&stmt, &[&since, &key]).await.map_err(pg_err)?;
        rows.iter()
            .map(|row| {
                Ok(UsageRow {
                    key: key_of_column(row.try_get(0).map_err(pg_err)?),
                    model: row.try_get(1).map_err(pg_err)?,
                    day: row.try_get(2).map_err(pg_err)?,
                    requests: count(row, 3)?,
                    input_tokens: count(row, 4)?,
                    output_tokens: count(row, 5)?,
                })
            })
            .collect()
    }

    async fn active_keys_exist(&self) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM service_keys WHERE revoked_at IS NULL)")
            .await
            .map_err(pg_err)?;
        client.query_one(&stmt, &[]).await.map_err(pg_err)?.try_get(0).map_err(pg_err)
    }

    async fn charge(&self, key: &ServiceKey, periods: &Periods) -> Result<Charge, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached("SELECT offload_charge($1, $2, $3, $4, $5)").await.map_err(pg_err)?;
        let (day_max, month_max) = (limit(key.limits.requests_per_day), limit(key.limits.requests_per_month));
        let row = client
            .query_one(&stmt, &[&key.id, &periods.day_key(), &periods.month_key(), &day_max, &month_max])
            .await
            .map_err(pg_err)?;
        match row.try_get::<_, i32>(0).map_err(pg_err)? {
            0 => Ok(Charge::Counted),
            1 => Ok(Charge::DayFull),
            2 => Ok(Charge::MonthFull),
            other => Err(StoreError::Corrupt(format!("offload_charge returned {other}"))),
        }
    }

    async fn refund(&self, key_id: &str, periods: &Periods) -> Result<(), StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached("SELECT offload_refund($1, $2, $3)").await.map_err(pg_err)?;
        client.execute(&stmt, &[&key_id, &periods.day_key(), &periods.month_key()]).await.map_err(pg_err)?;
        Ok(())
    }

    async fn admit(
        &self,
        key: &ServiceKey,
        periods: &Periods,
        node: NodeId,
        slot: SlotId,
    ) -> Result<Admit, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached("SELECT o_outcome, o_wait FROM offload_admit($1, $2, $3, $4, $5, $6, $7, $8, $9)")
            .await
            .map_err(pg_err)?;
        let limits = &key.limits;
        let (day_max, month_max) = (limit(limits.requests_per_day), limit(limits.requests_per_month));
        let max_in_flight = limits.max_in_flight.map(i64::from);
        let row = client
            .query_one(
                &stmt,
                &[
                    &key.id,
                    &periods.day_key(),
                    &periods.month_key(),
                    &day_max,
                    &month_max,
                    &limits.rate,
                    &max_in_flight,
                    &node.as_uuid(),
                    &slot.0,
                ],
            )
            .await
            .map_err(pg_err)?;
        let wait: f64 = row.try_get(1).map_err(pg_err)?;
        match row.try_get::<_, i32>(0).map_err(pg_err)? {
            0 => Ok(Admit::Admitted { took_slot: limits.max_in_flight.is_some(), took_token: limits.rate.is_some() }),
            1 => Ok(Admit::DayFull),
            2 => Ok(Admit::MonthFull),
            3 => Ok(Admit::InFlightFull),
            4 => Ok(Admit::RateLimited { wait }),
            other => Err(StoreError::Corrupt(format!("offload_admit returned {other}"))),
        }
    }

    async fn release_slot(&self, slot: SlotId) -> Result<(), StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached("DELETE FROM key_slots WHERE id = $1").await.map_err(pg_err)?;
        client.execute(&stmt, &[&slot.0]).await.map_err(pg_err)?;
        Ok(())
    }

    async fn return_token(&self, key: &ServiceKey) -> Result<(), StoreError> {
        let Some(rate) = key.limits.rate else { return Ok(()) };
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "UPDATE key_buckets SET tokens = least(greatest($2::float8, 1), tokens + 1) WHERE key_id = $1",
            )
            .await
            .map_err(pg_err)?;
        client.execute(&stmt, &[&key.id, &rate]).await.map_err(pg_err)?;
        Ok(())
    }

    async fn take_token(&self, key: &ServiceKey) -> Result<Result<(), f64>, StoreError> {
        let Some(rate) = key.limits.rate else { return Ok(Ok(())) };
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        // The lock `offload_admit` takes for this key: the bucket is read and written by one of them at a time.
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('offload_charge'), hashtext(current_schema() || '/' || $1))",
            &[&key.id],
        )
        .await
        .map_err(pg_err)?;
        let row = tx
            .query_one(
                "SELECT coalesce(least(greatest($2::float8, 1), b.tokens + greatest(n.now - b.at, 0) * $2::float8),
                                 greatest($2::float8, 1)), n.now
                 FROM (SELECT extract(epoch FROM clock_timestamp())::float8 AS now) n
                 LEFT JOIN key_buckets b ON b.key_id = $1",
                &[&key.id, &rate],
            )
            .await
            .map_err(pg_err)?;
        let (tokens, now): (f64, f64) = (row.try_get(0).map_err(pg_err)?, row.try_get(1).map_err(pg_err)?);
        if tokens < 1.0 {
            return Ok(Err((1.0 - tokens) / rate));
        }
        tx.execute(
            "INSERT INTO key_buckets (key_id, tokens, at) VALUES ($1, $2, $3)
             ON CONFLICT (key_id) DO UPDATE SET tokens = EXCLUDED.tokens, at = EXCLUDED.at",
            &[&key.id, &(tokens - 1.0), &now],
        )
        .await
        .map_err(pg_err)?;
        tx.commit().await.map_err(pg_err)?;
        Ok(Ok(()))
    }

    async fn release_orphaned_slots(&self) -> Result<usize, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "DELETE FROM key_slots s
                 WHERE (s.node IS NULL OR NOT EXISTS (SELECT 1 FROM nodes n WHERE n.id = s.node))
                   AND NOT EXISTS (
                       SELECT 1 FROM requests r WHERE r.owner = s.node AND r.status NOT IN ('done', 'error', 'stop')
                   )",
            )
            .await
            .map_err(pg_err)?;
        Ok(usize::try_from(client.execute(&stmt, &[]).await.map_err(pg_err)?).unwrap_or(usize::MAX))
    }
}
