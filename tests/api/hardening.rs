//! Hardening: who may read the store.

use crate::helpers::*;
use serde_json::json;

#[cfg(unix)]
fn mode_of(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o777
}

#[cfg(unix)]
#[tokio::test]
async fn the_store_is_readable_by_its_owner_only() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("fresh").join("data");
    let app = {
        let dir = dir.clone();
        spawn_with(move |a| a.data_dir = Some(dir)).await
    };
    // A request makes sure the WAL files exist and are written to.
    let created = app.stream(json!({"messages": user("private words")})).await;
    app.wait_final(&endpoint(&created, "status_url"), None).await;

    assert_eq!(mode_of(&dir), 0o700, "the data directory");
    for file in ["offload.db", "offload.db-wal", "offload.db-shm"] {
        assert_eq!(mode_of(&dir.join(file)), 0o600, "{file}");
    }
}

#[cfg(unix)]
#[tokio::test]
async fn a_store_readable_by_others_is_tightened_at_start() {
    use std::os::unix::fs::PermissionsExt;
    // What an older offload left behind: a store with the default modes (an empty file is a new database to
    // SQLite), and WAL files wider still.
    let dir = tempfile::tempdir().unwrap();
    let loosen = |path: &std::path::Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    loosen(dir.path(), 0o755);
    for (file, mode) in [("offload.db", 0o644), ("offload.db-wal", 0o666), ("offload.db-shm", 0o666)] {
        std::fs::write(dir.path().join(file), b"").unwrap();
        loosen(&dir.path().join(file), mode);
    }

    let app = spawn_with(|a| a.data_dir = Some(dir.path().to_path_buf())).await;
    assert_eq!(mode_of(dir.path()), 0o700, "the data directory");
    for file in ["offload.db", "offload.db-wal", "offload.db-shm"] {
        assert_eq!(mode_of(&dir.path().join(file)), 0o600, "{file}");
    }
    let created = app.stream(json!({"messages": user("still works")})).await;
    let doc = app.wait_final(&endpoint(&created, "status_url"), None).await;
    assert_eq!(doc["status"], "done");
}
