//! The node family on the embedded store. One server process uses a data directory, so leases here only ever
//! describe that process and its previous runs; the clock is the process's own.

use super::{SqliteStore, db_err};
use crate::domain::{NodeId, unix_now};
use crate::store::StoreError;
use crate::store::nodes::{NodeRecord, NodeStore, Renewal};
use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};
use std::time::Duration;

fn record(row: &rusqlite::Row<'_>) -> rusqlite::Result<(Vec<u8>, String)> {
    Ok((row.get(0)?, row.get(1)?))
}

fn decode((id, address): (Vec<u8>, String)) -> Result<NodeRecord, StoreError> {
    let id: [u8; 16] = id.try_into().map_err(|_| StoreError::Corrupt("node id".into()))?;
    Ok(NodeRecord { id: NodeId::from_bytes(id), address })
}

#[async_trait]
impl NodeStore for SqliteStore {
    fn shared(&self) -> bool {
        false
    }

    async fn join(&self, node: &NodeRecord, lease: Duration) -> Result<(), StoreError> {
        let (id, address, until) = (node.id, node.address.clone(), unix_now() + lease.as_secs_f64());
        self.write_with(move |w| {
            w.prepare_cached(
                "INSERT INTO nodes (id, address, lease_until) VALUES (?1, ?2, ?3)
                 ON CONFLICT (id) DO UPDATE SET address = excluded.address, lease_until = excluded.lease_until",
            )
            .and_then(|mut s| s.execute(params![&id.as_bytes()[..], address, until]))
            .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn renew(&self, id: NodeId, lease: Duration) -> Result<Renewal, StoreError> {
        let until = unix_now() + lease.as_secs_f64();
        self.write_with(move |w| {
            let renewed = w
                .prepare_cached("UPDATE nodes SET lease_until = ?2 WHERE id = ?1")
                .and_then(|mut s| s.execute(params![&id.as_bytes()[..], until]))
                .map_err(db_err)?;
            Ok(if renewed > 0 { Renewal::Renewed } else { Renewal::Lost })
        })
        .await
    }

    async fn leave(&self, id: NodeId) -> Result<(), StoreError> {
        self.write_with(move |w| {
            w.prepare_cached("DELETE FROM nodes WHERE id = ?1")
                .and_then(|mut s| s.execute([&id.as_bytes()[..]]))
                .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn node(&self, id: NodeId) -> Result<Option<NodeRecord>, StoreError> {
        self.read(move |conn| {
            conn.prepare_cached("SELECT id, address FROM nodes WHERE id = ?1")
                .and_then(|mut s| s.query_row([&id.as_bytes()[..]], record).optional())
                .map_err(db_err)?
                .map(decode)
                .transpose()
        })
        .await
    }

    async fn expired_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let now = unix_now();
        self.read(move |conn| {
            let mut stmt =
                conn.prepare_cached("SELECT id, address FROM nodes WHERE lease_until < ?1").map_err(db_err)?;
            let rows = stmt.query_map([now], record).map_err(db_err)?;
            rows.map(|r| decode(r.map_err(db_err)?)).collect()
        })
        .await
    }

    async fn remove_expired(&self, id: NodeId) -> Result<bool, StoreError> {
        let now = unix_now();
        self.write_with(move |w| {
            let removed = w
                .prepare_cached("DELETE FROM nodes WHERE id = ?1 AND lease_until < ?2")
                .and_then(|mut s| s.execute(params![&id.as_bytes()[..], now]))
                .map_err(db_err)?;
            Ok(removed > 0)
        })
        .await
    }

    async fn cluster_secret(&self, candidate: &[u8]) -> Result<Vec<u8>, StoreError> {
        let candidate = candidate.to_vec();
        self.write_with(move |w| {
            w.prepare_cached("INSERT INTO cluster_secret (id, secret) VALUES (1, ?1) ON CONFLICT (id) DO NOTHING")
                .and_then(|mut s| s.execute(params![candidate]))
                .map_err(db_err)?;
            w.prepare_cached("SELECT secret FROM cluster_secret WHERE id = 1")
                .and_then(|mut s| s.query_row([], |r| r.get(0)))
                .map_err(db_err)
        })
        .await
    }
}
