//! The shared store: one PostgreSQL database that several nodes use at once.
//!
//! Every node holds a small pool of connections ([`POOL_SIZE`]); each query is a statement prepared once per
//! connection and cached. Nothing is kept in memory between calls, so any node sees what any other wrote as soon as
//! it is committed, and every rule that spans rows is enforced by the database, not by the process:
//!
//! - A write batch ([`Store::write`](crate::store::Store::write)) is one statement, so one round trip and one
//!   implicit transaction whatever its size: the ops are grouped by kind into arrays (`UNNEST`) and applied by
//!   data-modifying `WITH` clauses ([`write`]). What the batch means is its
//!   [`Plan`](crate::store::pipeline::plan::Plan), shared with SQLite.
//! - A request's rows are written only while its row is locked (`FOR KEY SHARE`, taken in the same statement),
//!   and deleting a request deletes its row first, then its events, raw pieces and webhook in a later statement:
//!   a delete waits for a batch that writes to the request, so no event outlives its request.
//! - Claiming webhook deliveries locks the claimed rows (`FOR UPDATE SKIP LOCKED`), so two nodes never claim the
//!   same delivery; charging a quota runs in a function that holds a lock per key, so counts are exact.
//!
//! The schema is created and upgraded by the binary itself ([`migrate`]), under an advisory lock so that nodes
//! starting together take turns. Every object lives in one schema: the one given to [`PostgresStore::connect`],
//! else the first of the connection's `search_path` (usually `public`).
//!
//! One file per query family: [`requests`] (and [`write`], its writes), [`webhooks`], [`keys`].

mod keys;
mod nodes;
mod requests;
mod webhooks;
mod write;

use super::StoreError;
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use std::time::Duration;
use tokio_postgres::NoTls;

/// Connections per node. Writes come from one persister and a few background tasks; the rest serve reads of
/// requests no longer in memory. Sixteen per node leaves room for several nodes under PostgreSQL's default
/// `max_connections` of 100.
pub const POOL_SIZE: usize = 16;

/// How long a call waits for a connection (a free one from the pool, or a new one) before it fails as unavailable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a new connection may take to be set up (TCP and the startup exchange) before it counts as failed.
const DIAL_TIMEOUT: Duration = Duration::from_secs(3);

/// How long sent data may stay unacknowledged, and an idle connection unprobed, before the kernel drops the
/// connection: a database that vanished without closing its connections (a failover, a cut network) is noticed
/// within seconds instead of the kernel's default of about 15 minutes.
const DEAD_PEER: Duration = Duration::from_secs(10);

/// The advisory lock that serializes migrations across nodes (the bytes of "offload" and a 1).
const MIGRATION_LOCK: i64 = 0x6f66_666c_6f61_6401;

/// The schema, one step per version: step `i` brings version `i` to `i + 1`. Steps are only ever appended.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE requests (
    rkey bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id uuid NOT NULL CONSTRAINT requests_id_unique UNIQUE,
    kind smallint NOT NULL,
    access smallint NOT NULL,
    created_at bigint NOT NULL,
    bearer bytea,
    stream_token bytea,
    meta text NOT NULL,
    -- The request's parameters byte for byte as received (text, not jsonb, which would reorder and respace them).
    parameters text NOT NULL,
    status text NOT NULL,
    progress text NOT NULL,
    body text,
    final_at bigint
) WITH (fillfactor = 85); -- room on the page for progress updates to stay heap-only
CREATE INDEX requests_unfinished ON requests (status) WHERE status NOT IN ('done', 'error', 'stop');
CREATE INDEX requests_final_at ON requests (final_at) WHERE final_at IS NOT NULL;
-- Keyed by rkey, the requests' increasing internal key: the requests running now all append at the right edge
-- of the index, so a batch of chunks from many streams touches few index pages.
CREATE TABLE events (
    rkey bigint NOT NULL,
    seq bigint NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (rkey, seq)
);
CREATE TABLE raw_parts (
    rkey bigint NOT NULL,
    seq bigint NOT NULL,
    -- NULL: this piece is the request's events (1..=events_through, or all when that is NULL too).
    bytes bytea,
    events_through bigint,
    PRIMARY KEY (rkey, seq)
);
CREATE TABLE webhooks (
    request_id uuid PRIMARY KEY,
    url text NOT NULL,
    state text NOT NULL,
    next_attempt_at double precision NOT NULL,
    status text NOT NULL
);
CREATE INDEX webhooks_due ON webhooks (next_attempt_at) WHERE state IN ('pending', 'retrying');
CREATE TABLE service_keys (
    id text PRIMARY KEY,
    name text NOT NULL CONSTRAINT service_keys_name_unique UNIQUE,
    hash bytea NOT NULL UNIQUE,
    created_at bigint NOT NULL,
    revoked_at bigint,
    limits text NOT NULL
);
CREATE TABLE key_usage (
    key_id text NOT NULL,
    period text NOT NULL,
    count bigint NOT NULL,
    PRIMARY KEY (key_id, period)
);
-- Counts one request against a key's day and month, or says which is full (0 counted, 1 day full, 2 month
-- full). The lock makes charges of one key take turns on every node; each statement after it reads what the
-- previous holder committed (a volatile function takes a new snapshot per statement).
CREATE FUNCTION offload_charge(p_key text, p_day text, p_month text, p_day_max bigint, p_month_max bigint)
RETURNS integer LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('offload_charge'), hashtext(current_schema() || '/' || p_key));
    IF p_day_max IS NOT NULL
       AND COALESCE((SELECT count FROM key_usage WHERE key_id = p_key AND period = p_day), 0) >= p_day_max THEN
        RETURN 1;
    END IF;
    IF p_month_max IS NOT NULL
       AND COALESCE((SELECT count FROM key_usage WHERE key_id = p_key AND period = p_month), 0) >= p_month_max THEN
        RETURN 2;
    END IF;
    INSERT INTO key_usage (key_id, period, count) VALUES (p_key, p_day, 1), (p_key, p_month, 1)
    ON CONFLICT (key_id, period) DO UPDATE SET count = key_usage.count + 1;
    RETURN 0;
END
$$;
-- Takes back one counted request, under the same lock as charging.
CREATE FUNCTION offload_refund(p_key text, p_day text, p_month text)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('offload_charge'), hashtext(current_schema() || '/' || p_key));
    UPDATE key_usage SET count = GREATEST(count - 1, 0) WHERE key_id = p_key AND period IN (p_day, p_month);
END
$$;
"#,
    r#"
-- Cluster: every request records the node that runs it; nodes hold leases on the database's clock.
ALTER TABLE requests ADD COLUMN owner uuid;
CREATE TABLE nodes (
    id uuid PRIMARY KEY,
    address text NOT NULL,
    joined_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    lease_until timestamptz NOT NULL
);
-- Per-key in-flight slots (held by a node) and rate buckets: kept here so that they hold across nodes.
CREATE TABLE key_slots (
    id uuid PRIMARY KEY,
    key_id text NOT NULL,
    node uuid,
    taken_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX key_slots_by_key ON key_slots (key_id);
CREATE TABLE key_buckets (
    key_id text PRIMARY KEY,
    tokens double precision NOT NULL,
    at double precision NOT NULL
);
-- Admits one call against every limit of a key, under the key's lock (the one charging takes), on the database's
-- clock: 0 admitted, 1 day full, 2 month full, 3 in-flight full, 4 rate (with the wait for the next token).
-- A refusal changes nothing.
CREATE FUNCTION offload_admit(p_key text, p_day text, p_month text, p_day_max bigint, p_month_max bigint,
    p_rate double precision, p_max_in_flight bigint, p_node uuid, p_slot uuid)
RETURNS TABLE (o_outcome integer, o_wait double precision) LANGUAGE plpgsql AS $$
DECLARE
    v_now double precision := extract(epoch FROM clock_timestamp());
    v_tokens double precision;
    v_charged integer;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('offload_charge'), hashtext(current_schema() || '/' || p_key));
    IF p_max_in_flight IS NOT NULL
       AND (SELECT count(*) FROM key_slots s WHERE s.key_id = p_key) >= p_max_in_flight THEN
        RETURN QUERY SELECT 3, 0::double precision;
        RETURN;
    END IF;
    IF p_rate IS NOT NULL THEN
        SELECT least(greatest(p_rate, 1), b.tokens + (v_now - b.at) * p_rate) INTO v_tokens
        FROM key_buckets b WHERE b.key_id = p_key;
        IF NOT FOUND THEN
            v_tokens := greatest(p_rate, 1);
        END IF;
        IF v_tokens < 1 THEN
            RETURN QUERY SELECT 4, (1 - v_tokens) / p_rate;
            RETURN;
        END IF;
    END IF;
    v_charged := offload_charge(p_key, p_day, p_month, p_day_max, p_month_max);
    IF v_charged <> 0 THEN
        RETURN QUERY SELECT v_charged, 0::double precision;
        RETURN;
    END IF;
    IF p_rate IS NOT NULL THEN
        INSERT INTO key_buckets (key_id, tokens, at) VALUES (p_key, v_tokens - 1, v_now)
        ON CONFLICT (key_id) DO UPDATE SET tokens = EXCLUDED.tokens, at = EXCLUDED.at;
    END IF;
    IF p_max_in_flight IS NOT NULL THEN
        INSERT INTO key_slots (id, key_id, node) VALUES (p_slot, p_key, p_node);
    END IF;
    RETURN QUERY SELECT 0, 0::double precision;
END
$$;
"#,
    r#"
-- The secret that signs the calls nodes make to each other (one row).
CREATE TABLE cluster_secret (
    id smallint PRIMARY KEY CHECK (id = 1),
    secret bytea NOT NULL
);
"#,
    r#"
-- Requests and tokens per service key ('': none), model and UTC day, added to by every final status.
CREATE TABLE token_usage (
    key_id text NOT NULL,
    model text NOT NULL,
    day text NOT NULL,
    requests bigint NOT NULL,
    input_tokens bigint NOT NULL,
    output_tokens bigint NOT NULL,
    PRIMARY KEY (key_id, day, model)
);
CREATE INDEX token_usage_by_day ON token_usage (day);
"#,
];

pub struct PostgresStore {
    pool: Pool,
}

/// SQLSTATEs of failures that may pass when retried: connection exceptions (class 08), serialization failure,
/// deadlock, lock not available, the server shutting down or starting up, too many connections.
fn is_transient(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "40001" | "40P01" | "55P03" | "57P01" | "57P02" | "57P03" | "53300")
}

fn pg_err(e: tokio_postgres::Error) -> StoreError {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        // The message only: the detail may quote stored values.
        let text = format!("{} (SQLSTATE {code})", db.message());
        return if is_transient(code) { StoreError::Unavailable(text) } else { StoreError::Database(text) };
    }
    let cause = std::error::Error::source(&e);
    let text = match cause {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    };
    // No answer from the server: the connection failed or closed.
    if e.is_closed() || cause.is_some_and(|c| c.is::<std::io::Error>()) {
        StoreError::Unavailable(text)
    } else {
        StoreError::Database(text)
    }
}

fn pool_err(e: PoolError) -> StoreError {
    match e {
        PoolError::Backend(e) => pg_err(e),
        PoolError::Timeout(_) => {
            StoreError::Unavailable(format!("no database connection within {}s", CONNECT_TIMEOUT.as_secs()))
        }
        PoolError::Closed => StoreError::Closed,
        e => StoreError::Database(e.to_string()),
    }
}

/// Whether `name` can be a schema of ours: a plain lowercase identifier, so it needs no quoting anywhere.
fn valid_schema(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://user:password@host:port/database`, or the key=value form)
    /// and brings its schema up to date. With `schema`, every object lives in that schema (created if missing),
    /// which is set as the `search_path` of every connection; without, in the first schema of the connection's
    /// `search_path`. A schema name is lowercase letters, digits and `_`.
    pub async fn connect(url: &str, schema: Option<&str>) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|e: tokio_postgres::Error| {
            StoreError::Database(format!("the PostgreSQL URL is not valid: {e}"))
        })?;
        if let Some(schema) = schema {
            if !valid_schema(schema) {
                return Err(StoreError::Database(format!(
                    "{schema:?} is not a schema name offload uses: lowercase letters, digits and _, at most 63"
                )));
            }
            let options = match config.get_options() {
                Some(options) => format!("{options} -c search_path={schema}"),
                None => format!("-c search_path={schema}"),
            };
            config.options(options);
        }
        if config.get_application_name().is_none() {
            config.application_name("offload");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(DIAL_TIMEOUT);
        }
        config.keepalives(true).keepalives_idle(DEAD_PEER / 2).keepalives_interval(Duration::from_secs(1));
        config.keepalives_retries(5).tcp_user_timeout(DEAD_PEER);
        let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Database(format!("cannot build the connection pool: {e}")))?;
        let store = Self { pool };
        store.migrate(schema).await?;
        Ok(store)
    }

    /// Creates the schema, or upgrades it, in one transaction under an advisory lock: nodes that start together
    /// take turns, and the later ones find the work done.
    async fn migrate(&self, schema: Option<&str>) -> Result<(), StoreError> {
        let mut client = self.pool.get().await.map_err(pool_err)?;
        let tx = client.transaction().await.map_err(pg_err)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(pg_err)?;
        if let Some(schema) = schema {
            // A valid schema name needs no quoting (checked in `connect`).
            tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}")).await.map_err(pg_err)?;
        }
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_version (
                version integer PRIMARY KEY,
                applied_at timestamptz NOT NULL DEFAULT now()
            )",
        )
        .await
        .map_err(pg_err)?;
        let current: Option<i32> =
            tx.query_one("SELECT max(version) FROM schema_version", &[]).await.map_err(pg_err)?.get(0);
        let current = usize::try_from(current.unwrap_or(0)).unwrap_or(0);
        if current > MIGRATIONS.len() {
            return Err(StoreError::Database(format!(
                "the database schema is at version {current}, this offload knows versions up to {}; \
                 upgrade offload or use another schema",
                MIGRATIONS.len()
            )));
        }
        for (step, sql) in MIGRATIONS.iter().enumerate().skip(current) {
            tx.batch_execute(sql).await.map_err(pg_err)?;
            let version = i32::try_from(step + 1).unwrap_or(i32::MAX);
            tx.execute("INSERT INTO schema_version (version) VALUES ($1)", &[&version]).await.map_err(pg_err)?;
        }
        tx.commit().await.map_err(pg_err)
    }

    /// A connection from the pool.
    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.pool.get().await.map_err(pool_err)
    }

    /// `SELECT 1` on a connection of the pool, within `within` (getting the connection included). A connection that
    /// does not answer in time is closed rather than given back: its server may be gone without a word (a network
    /// cut drops packets), and the next caller must not wait on it too.
    async fn ping_within(&self, within: Duration) -> Result<(), StoreError> {
        let late = || StoreError::Unavailable(format!("the database did not answer within {within:?}"));
        let deadline = tokio::time::Instant::now() + within;
        let client = tokio::time::timeout_at(deadline, self.client()).await.map_err(|_| late())??;
        match tokio::time::timeout_at(deadline, client.simple_query("SELECT 1")).await {
            Ok(answer) => answer.map(drop).map_err(pg_err),
            Err(_) => {
                drop(deadpool_postgres::Object::take(client));
                Err(late())
            }
        }
    }
}

/// A count or position as PostgreSQL's `bigint`; past `i64::MAX` (never reached) it saturates.
fn int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_plain_identifiers() {
        for ok in ["offload", "offload_test_3f9a", "_x", "a1"] {
            assert!(valid_schema(ok), "{ok}");
        }
        for bad in ["", "1a", "Offload", "a-b", "a;drop", "a b", "\"a\"", &"a".repeat(64)] {
            assert!(!valid_schema(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn an_unreachable_server_is_a_retryable_error() {
        // Port 1: nothing listens there, the connection is refused at once.
        let result = PostgresStore::connect("postgres://postgres@127.0.0.1:1/test", None).await;
        assert!(result.is_err_and(|e| e.is_retryable()));
    }

    #[tokio::test]
    async fn a_bad_schema_name_is_refused_before_connecting() {
        let result = PostgresStore::connect("postgres://postgres@127.0.0.1:1/test", Some("a;b")).await;
        assert!(result.is_err_and(|e| !e.is_retryable() && e.to_string().contains("schema name")));
    }

    #[test]
    fn transient_states_are_retryable_and_others_are_not() {
        for code in ["40001", "40P01", "08006", "57P01", "53300"] {
            assert!(is_transient(code), "{code}");
        }
        for code in ["23505", "42P01", "22P02", "XX000"] {
            assert!(!is_transient(code), "{code}");
        }
    }
}
