//! The embedded store: one SQLite file in WAL mode.
//!
//! All writes run on one dedicated thread that owns the write connection (SQLite has a single writer anyway),
//! except a create's insert while that connection is free, which its caller commits ([`writer`]): the thread
//! executes, one at a time, what the pipeline's schedule ([`crate::store::pipeline::serial`]) hands it; a
//! batch is its plan ([`crate::store::pipeline::plan`]) in one transaction with cached statements, and read-modify-write operations such as charging a quota
//! are exact because nothing else writes in between. Reads use a small pool of read connections on the blocking
//! thread pool; WAL lets them run while the writer commits. Another process (the `offload keys` command) may
//! open the same file: SQLite's locking and the busy timeout keep them apart.
//!
//! The store holds private conversations, so only the user the server runs as may read it: the directory is
//! created 0700 and the database file 0600 (created empty by us before SQLite opens it: SQLite gives its `-wal`
//! and `-shm` files the database file's mode). A directory or file found with wider permissions is tightened at
//! start, with a warning in the log.
//!
//! One file per query family: [`requests`] (and [`write`], its writes), [`webhooks`], [`keys`].

mod keys;
mod nodes;
mod requests;
#[cfg(test)]
mod tests;
mod webhooks;
mod write;
mod writer;

use super::StoreError;
use crate::domain::RequestId;
use parking_lot::Mutex;
use rusqlite::Connection;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::oneshot;

/// The requests not final yet, as a condition on `status`: the partial index `requests_unfinished` and every
/// query that relies on it say it in these words (SQLite uses a partial index only for a query whose `WHERE`
/// contains the index's terms). Three comparisons, not `NOT IN ('done', 'error', 'stop')`: SQLite evaluates a
/// constant list of more than two values through a temporary B-tree built for each statement run, and an index's
/// condition runs for every row written (the old and the new one of an update): three such trees per status
/// write, measured as about a tenth of a streaming call's instructions (docs/DECISIONS.md, issue 21).
macro_rules! unfinished {
    () => {
        "status <> 'done' AND status <> 'error' AND status <> 'stop'"
    };
}
pub(super) use unfinished;

/// The index of the requests not final yet (recovery and takeover look them up), with [`unfinished`]'s condition.
macro_rules! unfinished_index {
    () => {
        concat!("CREATE INDEX IF NOT EXISTS requests_unfinished ON requests(status) WHERE ", unfinished!(), ";")
    };
}

/// The tables version 5 added (nodes, per-key in-flight slots and rate buckets): in the schema of a new store,
/// and in the upgrade of a version 4 one.
macro_rules! version_5_tables {
    () => {
        "
CREATE TABLE IF NOT EXISTS nodes (
    id BLOB PRIMARY KEY,
    address TEXT NOT NULL,
    lease_until REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS key_slots (
    id BLOB PRIMARY KEY,
    key_id TEXT NOT NULL,
    node BLOB
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS key_slots_by_key ON key_slots(key_id);
CREATE TABLE IF NOT EXISTS key_buckets (
    key_id TEXT PRIMARY KEY,
    tokens REAL NOT NULL,
    at REAL NOT NULL
) WITHOUT ROWID;
PRAGMA user_version = 5;
"
    };
}

/// The table version 6 added: requests and tokens per service key (`''`: none), model and UTC day.
macro_rules! version_6_tables {
    () => {
        "
CREATE TABLE IF NOT EXISTS token_usage (
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    day TEXT NOT NULL,
    requests INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    PRIMARY KEY (key_id, day, model)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS token_usage_by_day ON token_usage(day);
PRAGMA user_version = 6;
"
    };
}

const SCHEMA: &str = concat!(
    "
CREATE TABLE IF NOT EXISTS requests (
    rkey INTEGER PRIMARY KEY,
    id BLOB NOT NULL UNIQUE,
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
    final_at INTEGER,
    owner BLOB
);
",
    unfinished_index!(),
    "
CREATE INDEX IF NOT EXISTS requests_final_at ON requests(final_at) WHERE final_at IS NOT NULL;
-- Rows in arrival order: with thousands of streams appending at once, a commit's chunks sit on a few
-- consecutive pages instead of one page per stream; only the small index entries scatter.
CREATE TABLE IF NOT EXISTS events (
    pos INTEGER PRIMARY KEY,
    rkey INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS events_by_request ON events(rkey, seq);
CREATE TABLE IF NOT EXISTS raw_parts (
    rkey INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    -- NULL: this piece is the request's events (1..=events_through, or all when that is NULL too).
    bytes BLOB,
    events_through INTEGER,
    PRIMARY KEY (rkey, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS webhooks (
    request_id BLOB PRIMARY KEY,
    url TEXT NOT NULL,
    state TEXT NOT NULL,
    next_attempt_at REAL NOT NULL,
    status TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS webhooks_due ON webhooks(next_attempt_at) WHERE state IN ('pending', 'retrying');
CREATE TABLE IF NOT EXISTS service_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    hash BLOB NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER,
    limits TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS key_usage (
    key_id TEXT NOT NULL,
    period TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (key_id, period)
) WITHOUT ROWID;
-- The secret that would sign calls between nodes (one row; kept for the store contract: one process uses this store).
CREATE TABLE IF NOT EXISTS cluster_secret (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    secret BLOB NOT NULL
);
",
    version_5_tables!(),
    version_6_tables!(),
    "PRAGMA user_version = 7;"
);

/// The schema version this code reads and writes.
const SCHEMA_VERSION: i64 = 7;

/// Upgrades from an older version, step by step; step `i` brings version `4 + i` to `5 + i`.
const UPGRADES: &[&str] = &[
    concat!("ALTER TABLE requests ADD COLUMN owner BLOB;", version_5_tables!()),
    version_6_tables!(),
    // Version 7: the index of unfinished requests without a constant list (see [`unfinished`]).
    concat!("DROP INDEX IF EXISTS requests_unfinished;", unfinished_index!(), "PRAGMA user_version = 7;"),
];

/// The oldest version [`UPGRADES`] start from.
const OLDEST_UPGRADABLE: i64 = 4;

/// What the writer thread owns: the write connection, and the internal key of every live request.
///
/// Requests are public by a random UUID, but their events and raw pieces are keyed by `rkey`, the table's
/// increasing rowid: the rows of the requests running now all sit at the end of the B-trees, so a commit dirties
/// few pages. The map saves a lookup per chunk; an entry leaves when its request is final or deleted.
pub(super) struct Writer {
    conn: Connection,
    rkeys: HashMap<RequestId, i64>,
    /// Where the writer finds its work; a long batch looks here between writes for creates waiting.
    queue: Arc<write::Queue>,
    checkpoints: Arc<writer::Checkpoints>,
}

impl std::ops::Deref for Writer {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.conn
    }
}

impl std::ops::DerefMut for Writer {
    fn deref_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }
}

/// Work for the writer thread; it sends its own result back.
type WriteJob = Box<dyn FnOnce(&mut Writer) + Send>;

pub struct SqliteStore {
    queue: Arc<write::Queue>,
    shared: Arc<writer::Shared>,
    readers: Arc<ReadPool>,
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.queue.close();
    }
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

/// A busy or locked database (another connection holds the lock past the busy timeout, or a read snapshot went
/// stale before its write) may pass on a second try; anything else will not.
fn db_err(e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
            StoreError::Unavailable(e.to_string())
        }
        _ => StoreError::Database(e.to_string()),
    }
}

fn json_err(e: serde_json::Error) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

fn open(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(db_err)?;
    conn.busy_timeout(writer::BUSY_TIMEOUT).map_err(db_err)?;
    Ok(conn)
}

/// `offload.db-wal`, `offload.db-shm`: the files SQLite keeps next to the database in WAL mode.
fn wal_file(db: &Path, suffix: &str) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Files and directories only their owner may use.
#[cfg(unix)]
mod owner_only {
    use std::fs::{DirBuilder, OpenOptions, Permissions};
    use std::io;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    use std::path::Path;

    /// The most a directory of the store may allow: its owner's.
    pub const DIR: u32 = 0o700;
    /// The most a file of the store may allow: reading and writing by its owner.
    pub const FILE: u32 = 0o600;

    /// Creates the directory (and missing parents) 0700, or tightens it if it exists.
    pub fn create_dir(dir: &Path) -> io::Result<()> {
        DirBuilder::new().recursive(true).mode(DIR).create(dir)?;
        tighten(dir, DIR)
    }

    /// Creates an empty file 0600 if there is none (SQLite takes an empty file as a new database), or tightens
    /// the one there.
    pub fn create_file(path: &Path) -> io::Result<()> {
        match OpenOptions::new().write(true).create_new(true).mode(FILE).open(path) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => tighten(path, FILE),
            Err(e) => Err(e),
        }
    }

    /// Takes away every permission beyond `allowed` from `path`, if it exists. A path that cannot be tightened
    /// (owned by another user) stops the start: the store would be readable by others.
    pub fn tighten(path: &Path, allowed: u32) -> io::Result<()> {
        let mode = match std::fs::metadata(path) {
            Ok(meta) => meta.permissions().mode() & 0o7777,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if mode & 0o777 & !allowed == 0 {
            return Ok(());
        }
        let tightened = mode & allowed;
        std::fs::set_permissions(path, Permissions::from_mode(tightened)).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "{} has mode {mode:04o}, open to other users, and cannot be changed to {tightened:04o} ({e}); \
                     change it yourself or run offload as its owner",
                    path.display()
                ),
            )
        })?;
        tracing::warn!(
            path = %path.display(),
            from = %format!("{mode:04o}"),
            to = %format!("{tightened:04o}"),
            "the store was open to other users; its permissions were tightened"
        );
        Ok(())
    }
}

/// Elsewhere the platform's defaults apply.
#[cfg(not(unix))]
mod owner_only {
    use std::io;
    use std::path::Path;

    pub const FILE: u32 = 0;

    pub fn create_dir(dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }

    pub fn create_file(_path: &Path) -> io::Result<()> {
        Ok(())
    }

    pub fn tighten(_path: &Path, _allowed: u32) -> io::Result<()> {
        Ok(())
    }
}

/// Copies the WAL back into the database file every quarter second, without blocking the writer (a passive
/// checkpoint takes no lock the writer needs). Ends when the store is dropped.
///
/// Once a checkpoint has copied every frame, the next write starts the log over, and SQLite syncs the new log's
/// header to disk before it goes on (even at `synchronous=NORMAL`: a reordered write after a restart could
/// otherwise corrupt the database). Left to itself that sync lands in whatever write comes next, a create's
/// insert most often: the create then waits for the disk (measured: the two-round-trip time to first chunk's
/// p99). So the writer starts the log over at once, with a write of its own, while no create waits for it.
fn checkpoint_loop(
    conn: Connection,
    alive: std::sync::Weak<ReadPool>,
    writer: std::sync::Weak<write::Queue>,
    checkpoints: Arc<writer::Checkpoints>,
) {
    while alive.strong_count() > 0 {
        std::thread::sleep(std::time::Duration::from_millis(250));
        let frames = checkpoints.checkpoint(|| {
            conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)))
        });
        match frames {
            // More than the restart's own frame: once idle, the server stops after one restart (the first write
            // after a quiet spell then starts the log over itself).
            Ok((log, copied)) if log > 1 && copied == log => {
                if let Some(queue) = writer.upgrade() {
                    let _ = queue.push(Box::new(restart_log));
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed; retrying"),
        }
    }
}

/// Starts the WAL over (see [`checkpoint_loop`]): the smallest write, the schema version set to what it is
/// (checked at open), one page.
fn restart_log(w: &mut Writer) {
    let checkpoints = w.checkpoints.clone();
    if let Err(e) = checkpoints.writing(|| w.conn.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))) {
        tracing::warn!(error = %e, "could not start the WAL over; the next write will");
    }
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
        owner_only::create_dir(data_dir)
            .map_err(|e| StoreError::Database(format!("cannot prepare {}: {e}", data_dir.display())))?;
        let path = data_dir.join("offload.db");
        owner_only::create_file(&path)
            .map_err(|e| StoreError::Database(format!("cannot prepare {}: {e}", path.display())))?;
        let companions = [wal_file(&path, "-wal"), wal_file(&path, "-shm")];
        for file in &companions {
            owner_only::tighten(file, owner_only::FILE).map_err(|e| StoreError::Database(e.to_string()))?;
        }
        let conn = open(&path)?;
        let sync = match synchronous {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        };
        // Checkpoints run on their own thread (below), never inside a commit of the writer.
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync}; PRAGMA wal_autocheckpoint = 0;"
        ))
        .map_err(db_err)?;
        let mut version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(db_err)?;
        while (OLDEST_UPGRADABLE..SCHEMA_VERSION).contains(&version) {
            let step = usize::try_from(version - OLDEST_UPGRADABLE).unwrap_or(usize::MAX);
            let Some(sql) = UPGRADES.get(step) else { break };
            conn.execute_batch(&format!("BEGIN; {sql} COMMIT;")).map_err(db_err)?;
            tracing::info!(from = version, to = version + 1, "upgraded the store's schema");
            version += 1;
        }
        if version != 0 && version != SCHEMA_VERSION {
            return Err(StoreError::Database(format!(
                "{} has schema version {version}, this offload reads version {SCHEMA_VERSION}; use a new --data-dir",
                path.display()
            )));
        }
        conn.execute_batch(SCHEMA).map_err(db_err)?;
        // SQLite has created the WAL files by now, with the database file's mode; this only checks it did.
        for file in &companions {
            owner_only::tighten(file, owner_only::FILE).map_err(|e| StoreError::Database(e.to_string()))?;
        }

        let queue = Arc::new(write::Queue::default());
        let checkpoints = Arc::new(writer::Checkpoints::default());
        let writer = Writer { conn, rkeys: HashMap::new(), queue: queue.clone(), checkpoints: checkpoints.clone() };
        let shared = Arc::new(writer::Shared::new(writer, synchronous == Synchronous::Normal));
        // A plain executor: the schedule is the queue's (the pipeline's).
        writer::start(shared.clone(), queue.clone())?;
        let readers = Arc::new(ReadPool { path: path.clone(), idle: Mutex::new(Vec::new()) });
        let checkpoint_conn = open(&path)?;
        let alive = Arc::downgrade(&readers);
        let writer_queue = Arc::downgrade(&queue);
        std::thread::Builder::new()
            .name("offload-sqlite-checkpoint".into())
            .spawn(move || checkpoint_loop(checkpoint_conn, alive, writer_queue, checkpoints))
            .map_err(|e| StoreError::Database(format!("cannot start the checkpoint thread: {e}")))?;
        Ok(Self { queue, shared, readers })
    }

    /// Runs `f` on the writer thread, after every write queued before it.
    async fn write_with<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Writer) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let (done, wait) = oneshot::channel();
        let job: WriteJob = Box::new(move |conn| {
            let _ = done.send(f(conn));
        });
        self.queue.push(job)?;
        wait.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs `f` on a read connection of the pool.
    async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let pool = self.readers.clone();
        tokio::task::spawn_blocking(move || pool.with(f)).await.map_err(|_| StoreError::Closed)?
    }
}
