//! SQLite only: a create's insert is committed on its caller's thread while the write connection is free, but never
//! by waiting there: another process holding the database's write lock (the `offload keys` command) sends the insert
//! to the writer thread, which waits for the lock as every write of the store does, while the caller's runtime
//! goes on.

use super::meta;
use offload::domain::Access;
use offload::store::{Store, WriteOp};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub async fn an_insert_waiting_for_another_process_lock_does_not_hold_up_its_thread() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(offload::store::sqlite::SqliteStore::open(dir.path(), Default::default()).unwrap());
    // Committed on the caller's thread, the connection being free.
    let first = meta(Access::Public);
    store.write_urgent_here(vec![WriteOp::Insert(first.clone())].into()).await.unwrap();
    assert!(store.get(first.locator.id).await.unwrap().is_some());

    let other = rusqlite::Connection::open(dir.path().join("offload.db")).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let released = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        other.execute_batch("COMMIT").unwrap();
    });
    // This test runs on one thread: the ticker only counts while the insert's caller does not hold that thread.
    let ticks = Arc::new(AtomicU32::new(0));
    let ticker = tokio::spawn({
        let ticks = ticks.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
                ticks.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    let second = meta(Access::Public);
    store.write_urgent_here(vec![WriteOp::Insert(second.clone())].into()).await.unwrap();
    let counted = ticks.load(Ordering::SeqCst);
    ticker.abort();
    released.join().unwrap();
    assert!(counted >= 10, "the runtime's thread was held while the insert waited for the lock ({counted} ticks)");
    assert!(store.get(second.locator.id).await.unwrap().is_some(), "the insert was stored once the lock was free");
}
