//! What the store's SQL costs SQLite: checked on the plans SQLite makes, not timed.

use super::{SqliteStore, Synchronous, open, write};

/// Whether SQLite's program for `sql` builds a temporary B-tree each time it runs (`OpenEphemeral`).
fn builds_a_temporary_tree(conn: &rusqlite::Connection, sql: &str) -> bool {
    let mut explain = conn.prepare(&format!("EXPLAIN {sql}")).unwrap();
    let nulls = rusqlite::params_from_iter(std::iter::repeat_n(rusqlite::types::Null, explain.parameter_count()));
    let opcodes: Vec<String> =
        explain.query_map(nulls, |r| r.get::<_, String>(1)).unwrap().map(Result::unwrap).collect();
    assert!(!opcodes.is_empty(), "no program for {sql}");
    opcodes.iter().any(|op| op == "OpenEphemeral")
}

#[test]
fn no_write_of_a_request_builds_a_temporary_tree() {
    let dir = tempfile::tempdir().unwrap();
    let _store = SqliteStore::open(dir.path(), Synchronous::Normal).unwrap();
    let conn = open(&dir.path().join("offload.db")).unwrap();
    for sql in write::PER_REQUEST {
        assert!(!builds_a_temporary_tree(&conn, sql), "{sql}");
    }
}

/// A version 6 store (its index of unfinished requests by a constant list, which SQLite evaluates through a
/// temporary tree for every row written) gets the index in three comparisons when opened.
#[test]
fn a_version_6_store_gets_the_unfinished_index_without_a_list() {
    let dir = tempfile::tempdir().unwrap();
    drop(SqliteStore::open(dir.path(), Synchronous::Normal).unwrap());
    let path = dir.path().join("offload.db");
    let conn = open(&path).unwrap();
    conn.execute_batch(
        "DROP INDEX requests_unfinished;
         CREATE INDEX requests_unfinished ON requests(status) WHERE status NOT IN ('done', 'error', 'stop');
         PRAGMA user_version = 6;",
    )
    .unwrap();
    assert!(write::PER_REQUEST.iter().any(|sql| builds_a_temporary_tree(&conn, sql)), "the old index costs a tree");
    drop(conn);
    drop(SqliteStore::open(dir.path(), Synchronous::Normal).unwrap());
    let conn = open(&path).unwrap();
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(version, 7);
    for sql in write::PER_REQUEST {
        assert!(!builds_a_temporary_tree(&conn, sql), "{sql}");
    }
    let plan: String = conn
        .query_row(&format!("EXPLAIN QUERY PLAN SELECT id FROM requests WHERE {}", super::unfinished!()), [], |r| {
            r.get(3)
        })
        .unwrap();
    assert!(plan.contains("requests_unfinished"), "the unfinished requests are found by their index: {plan}");
}
