//! SQLite only: once a checkpoint has copied the whole WAL, the store starts the log over with a write of its own,
//! so that the disk sync of the new log's header is not paid inside the next create's commit.

use super::{meta, write};
use offload::domain::Access;
use offload::store::{Store, WriteOp};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The frames in the WAL, as a passive checkpoint of another connection reports them.
fn wal_frames(db: &std::path::Path) -> i64 {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1)).unwrap()
}

pub async fn the_wal_is_started_over_after_a_checkpoint_by_the_store_itself() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(offload::store::sqlite::SqliteStore::open(dir.path(), Default::default()).unwrap());
    for _ in 0..20 {
        write(&store, vec![WriteOp::Insert(meta(Access::Public))]).await;
    }
    let db = dir.path().join("offload.db");
    // Left alone, the WAL keeps its copied frames until the next write starts it over; the store's checkpoint
    // (every quarter second) has the writer start it over at once: one frame, the restart's own.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut frames = wal_frames(&db);
    while frames != 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        frames = wal_frames(&db);
    }
    assert_eq!(frames, 1, "the WAL was not started over after its checkpoint");
    // An idle store stays idle: no restart after the restart.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(wal_frames(&db), 1);
    drop(store);
}
