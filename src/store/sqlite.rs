//! The embedded store: one SQLite file in WAL mode.
//!
//! All writes go through one dedicated thread that owns the write connection (SQLite has a single writer
//! anyway), so a batch is one transaction with cached statements. Reads use a small pool of read connections on
//! the blocking thread pool; WAL lets them run while the writer commits.

use super::{Store, StoreError, StoredRequest, WriteOp};
use crate::document::model::Options;
use crate::document::{Progress, RequestMeta};
use crate::domain::{Access, Kind, Locator, RequestId, TokenHash};
use async_trait::async_trait;
use parking_lot::Mutex;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS requests (
    id BLOB PRIMARY KEY,
    kind INTEGER NOT NULL,
    access INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    bearer BLOB,
    stream_token BLOB,
    meta TEXT NOT NULL,
    parameters TEXT NOT NULL,
    status TEXT NOT NULL,
    progress TEXT NOT NULL,
    body TEXT,
    final_at INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS requests_unfinished ON requests(status) WHERE status NOT IN ('done', 'error', 'stop');
CREATE TABLE IF NOT EXISTS events (
    request_id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (request_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS raw_parts (
    request_id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    bytes BLOB NOT NULL,
    PRIMARY KEY (request_id, seq)
) WITHOUT ROWID;
PRAGMA user_version = 1;
";

/// The parts of [`RequestMeta`] kept as one JSON column.
#[derive(Serialize, Deserialize)]
struct MetaColumn {
    created: f64,
    conversation_id: String,
    options: Options,
    #[serde(default)]
    from_status_url: Option<String>,
}

/// What the writer thread does: apply a batch, or delete one request (answering whether it existed).
enum Job {
    Batch(Arc<[WriteOp]>),
    Delete(RequestId),
}

type WriteJob = (Job, oneshot::Sender<Result<bool, StoreError>>);

pub struct SqliteStore {
    writer: mpsc::Sender<WriteJob>,
    readers: Arc<ReadPool>,
}

/// Whether a commit waits for the disk (`full`) or only for the OS (`normal`, the default: a killed process
/// loses nothing, a power cut may lose the last commits).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Synchronous {
    #[default]
    Normal,
    Full,
}

struct ReadPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

fn db_err(e: rusqlite::Error) -> StoreError {
    StoreError::Database(e.to_string())
}

fn open(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(db_err)?;
    conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(db_err)?;
    Ok(conn)
}

impl ReadPool {
    fn with<R>(&self, f: impl FnOnce(&Connection) -> Result<R, StoreError>) -> Result<R, StoreError> {
        let conn = match self.idle.lock().pop() {
            Some(conn) => conn,
            None => open(&self.path)?,
        };
        let result = f(&conn);
        let mut idle = self.idle.lock();
        if idle.len() < 8 {
            idle.push(conn);
        }
        result
    }
}

impl SqliteStore {
    /// Opens (creating if needed) `offload.db` in `data_dir`.
    pub fn open(data_dir: &Path, synchronous: Synchronous) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| StoreError::Database(format!("cannot create {}: {e}", data_dir.display())))?;
        let path = data_dir.join("offload.db");
        let conn = open(&path)?;
        let sync = match synchronous {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        };
        conn.execute_batch(&format!("PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync};")).map_err(db_err)?;
        conn.execute_batch(SCHEMA).map_err(db_err)?;

        let (tx, rx) = mpsc::channel::<WriteJob>(1024);
        std::thread::Builder::new()
            .name("offload-sqlite-writer".into())
            .spawn(move || writer_loop(conn, rx))
            .map_err(|e| StoreError::Database(format!("cannot start the writer thread: {e}")))?;
        Ok(Self { writer: tx, readers: Arc::new(ReadPool { path, idle: Mutex::new(Vec::new()) }) })
    }

    async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let pool = self.readers.clone();
        tokio::task::spawn_blocking(move || pool.with(f)).await.map_err(|_| StoreError::Closed)?
    }
}

fn writer_loop(mut conn: Connection, mut rx: mpsc::Receiver<WriteJob>) {
    while let Some((job, done)) = rx.blocking_recv() {
        let result = match job {
            Job::Batch(ops) => apply(&mut conn, &ops).map(|()| true),
            Job::Delete(id) => delete(&mut conn, id),
        };
        let _ = done.send(result);
    }
}

fn delete(conn: &mut Connection, id: RequestId) -> Result<bool, StoreError> {
    let tx = conn.transaction().map_err(db_err)?;
    tx.execute("DELETE FROM events WHERE request_id = ?1", [id.as_bytes()]).map_err(db_err)?;
    tx.execute("DELETE FROM raw_parts WHERE request_id = ?1", [id.as_bytes()]).map_err(db_err)?;
    let deleted = tx.execute("DELETE FROM requests WHERE id = ?1", [id.as_bytes()]).map_err(db_err)?;
    tx.commit().map_err(db_err)?;
    Ok(deleted > 0)
}

fn apply(conn: &mut Connection, ops: &[WriteOp]) -> Result<(), StoreError> {
    let tx = conn.transaction().map_err(db_err)?;
    for op in ops {
        match op {
            WriteOp::Insert(meta) => {
                let column = MetaColumn {
                    created: meta.created,
                    conversation_id: meta.conversation_id.clone(),
                    options: meta.options.clone(),
                    from_status_url: meta.from_status_url.clone(),
                };
                let meta_json = serde_json::to_string(&column).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                let progress =
                    serde_json::to_string(&Progress::pending()).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                tx.prepare_cached(
                    "INSERT INTO requests (id, kind, access, created_at, bearer, stream_token, meta, parameters, status, progress)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'pending', ?9)",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        meta.locator.id.as_bytes(),
                        meta.locator.kind.code(),
                        meta.locator.access.code(),
                        meta.locator.created_at,
                        meta.bearer.as_ref().map(|h| h.as_bytes().to_vec()),
                        meta.stream_token.as_ref().map(|h| h.as_bytes().to_vec()),
                        meta_json,
                        meta.parameters.get(),
                        progress,
                    ])
                })
                .map_err(db_err)?;
            }
            WriteOp::Event { id, seq, data } => {
                tx.prepare_cached("INSERT OR REPLACE INTO events (request_id, seq, data) VALUES (?1, ?2, ?3)")
                    .and_then(|mut s| s.execute(params![id.as_bytes(), seq, &**data]))
                    .map_err(db_err)?;
            }
            WriteOp::Raw { id, seq, bytes } => {
                tx.prepare_cached("INSERT OR REPLACE INTO raw_parts (request_id, seq, bytes) VALUES (?1, ?2, ?3)")
                    .and_then(|mut s| s.execute(params![id.as_bytes(), seq, &bytes[..]]))
                    .map_err(db_err)?;
            }
            WriteOp::Progress { id, progress } => {
                let json = serde_json::to_string(progress).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                tx.prepare_cached("UPDATE requests SET status = ?2, progress = ?3 WHERE id = ?1")
                    .and_then(|mut s| s.execute(params![id.as_bytes(), progress.status.as_str(), json]))
                    .map_err(db_err)?;
            }
            WriteOp::Finish { id, progress, body } => {
                let json = serde_json::to_string(progress).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                let final_at = progress.processed_at.map(|t| t as i64);
                tx.prepare_cached(
                    "UPDATE requests SET status = ?2, progress = ?3, body = ?4, final_at = ?5 WHERE id = ?1",
                )
                .and_then(|mut s| s.execute(params![id.as_bytes(), progress.status.as_str(), json, body, final_at]))
                .map_err(db_err)?;
            }
        }
    }
    tx.commit().map_err(db_err)
}

const SELECT_REQUEST: &str =
    "SELECT id, kind, access, created_at, bearer, stream_token, meta, parameters, progress, body,
    (SELECT COALESCE(MAX(seq), 0) FROM events WHERE request_id = requests.id) FROM requests";

fn row_to_request(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<StoredRequest, StoreError>> {
    let id: Vec<u8> = row.get(0)?;
    let kind: u8 = row.get(1)?;
    let access: u8 = row.get(2)?;
    let created_at: i64 = row.get(3)?;
    let bearer: Option<Vec<u8>> = row.get(4)?;
    let stream_token: Option<Vec<u8>> = row.get(5)?;
    let meta: String = row.get(6)?;
    let parameters: String = row.get(7)?;
    let progress: String = row.get(8)?;
    let body: Option<String> = row.get(9)?;
    let event_count: i64 = row.get(10)?;
    Ok(decode(id, kind, access, created_at, bearer, stream_token, &meta, parameters, &progress, body, event_count))
}

#[expect(clippy::too_many_arguments, reason = "one argument per stored column")]
fn decode(
    id: Vec<u8>,
    kind: u8,
    access: u8,
    created_at: i64,
    bearer: Option<Vec<u8>>,
    stream_token: Option<Vec<u8>>,
    meta: &str,
    parameters: String,
    progress: &str,
    body: Option<String>,
    event_count: i64,
) -> Result<StoredRequest, StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(what.to_owned());
    let id = RequestId::from_bytes(id.try_into().map_err(|_| corrupt("request id"))?);
    let column: MetaColumn = serde_json::from_str(meta).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let hash =
        |b: Option<Vec<u8>>| b.map(|b| TokenHash::from_bytes(&b).ok_or_else(|| corrupt("token hash"))).transpose();
    Ok(StoredRequest {
        meta: RequestMeta {
            locator: Locator {
                kind: Kind::from_code(kind).ok_or_else(|| corrupt("kind"))?,
                access: Access::from_code(access).ok_or_else(|| corrupt("access"))?,
                created_at,
                id,
            },
            created: column.created,
            conversation_id: column.conversation_id,
            bearer: hash(bearer)?,
            stream_token: hash(stream_token)?,
            options: column.options,
            from_status_url: column.from_status_url,
            parameters: RawValue::from_string(parameters).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        },
        progress: serde_json::from_str(progress).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        body,
        event_count: u64::try_from(event_count).unwrap_or(0),
    })
}

#[async_trait]
impl Store for SqliteStore {
    async fn write(&self, ops: Arc<[WriteOp]>) -> Result<(), StoreError> {
        let (done, wait) = oneshot::channel();
        self.writer.send((Job::Batch(ops), done)).await.map_err(|_| StoreError::Closed)?;
        wait.await.map_err(|_| StoreError::Closed)?.map(|_| ())
    }

    async fn get(&self, id: RequestId) -> Result<Option<StoredRequest>, StoreError> {
        self.read(move |conn| {
            conn.prepare_cached(&format!("{SELECT_REQUEST} WHERE id = ?1"))
                .and_then(|mut s| s.query_row([id.as_bytes()], row_to_request).optional())
                .map_err(db_err)?
                .transpose()
        })
        .await
    }

    async fn events(&self, id: RequestId, after: u64, limit: usize) -> Result<Vec<(u64, String)>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached("SELECT seq, data FROM events WHERE request_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3")
                .map_err(db_err)?;
            let rows = stmt
                .query_map(params![id.as_bytes(), after, limit as i64], |r| Ok((r.get::<_, u64>(0)?, r.get(1)?)))
                .map_err(db_err)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db_err)
        })
        .await
    }

    async fn raw(&self, id: RequestId) -> Result<Vec<u8>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached("SELECT bytes FROM raw_parts WHERE request_id = ?1 ORDER BY seq")
                .map_err(db_err)?;
            let mut rows = stmt.query([id.as_bytes()]).map_err(db_err)?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().map_err(db_err)? {
                let part = row.get_ref(0).map_err(db_err)?.as_blob().map_err(|e| StoreError::Corrupt(e.to_string()))?;
                out.extend_from_slice(part);
            }
            Ok(out)
        })
        .await
    }

    async fn delete(&self, id: RequestId) -> Result<bool, StoreError> {
        // Through the writer thread, so that it is ordered after every batch queued before it.
        let (done, wait) = oneshot::channel();
        self.writer.send((Job::Delete(id), done)).await.map_err(|_| StoreError::Closed)?;
        wait.await.map_err(|_| StoreError::Closed)?
    }

    async fn unfinished(&self) -> Result<Vec<StoredRequest>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare(&format!("{SELECT_REQUEST} WHERE status NOT IN ('done', 'error', 'stop')"))
                .map_err(db_err)?;
            let rows = stmt.query_map([], row_to_request).map_err(db_err)?;
            rows.map(|r| r.map_err(db_err)?).collect()
        })
        .await
    }
}
