//! The node family: leases on the database's clock, so that nodes with skewed clocks agree on who expired.

use super::{PostgresStore, pg_err};
use crate::domain::NodeId;
use crate::store::StoreError;
use crate::store::nodes::{NodeRecord, NodeStore, Renewal};
use async_trait::async_trait;
use std::time::Duration;
use uuid::Uuid;

fn record(row: &tokio_postgres::Row) -> Result<NodeRecord, StoreError> {
    let id: Uuid = row.try_get(0).map_err(pg_err)?;
    Ok(NodeRecord { id: NodeId::from_bytes(*id.as_bytes()), address: row.try_get(1).map_err(pg_err)? })
}

#[async_trait]
impl NodeStore for PostgresStore {
    fn shared(&self) -> bool {
        true
    }

    async fn join(&self, node: &NodeRecord, lease: Duration) -> Result<(), StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "INSERT INTO nodes (id, address, lease_until) VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3))
                 ON CONFLICT (id) DO UPDATE SET address = EXCLUDED.address, lease_until = EXCLUDED.lease_until",
            )
            .await
            .map_err(pg_err)?;
        client.execute(&stmt, &[&node.id.as_uuid(), &node.address, &lease.as_secs_f64()]).await.map_err(pg_err)?;
        Ok(())
    }

    async fn renew(&self, id: NodeId, lease: Duration) -> Result<Renewal, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "UPDATE nodes SET lease_until = clock_timestamp() + make_interval(secs => $2) WHERE id = $1",
            )
            .await
            .map_err(pg_err)?;
        let renewed = client.execute(&stmt, &[&id.as_uuid(), &lease.as_secs_f64()]).await.map_err(pg_err)?;
        Ok(if renewed > 0 { Renewal::Renewed } else { Renewal::Lost })
    }

    async fn leave(&self, id: NodeId) -> Result<(), StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached("DELETE FROM nodes WHERE id = $1").await.map_err(pg_err)?;
        client.execute(&stmt, &[&id.as_uuid()]).await.map_err(pg_err)?;
        Ok(())
    }

    async fn node(&self, id: NodeId) -> Result<Option<NodeRecord>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached("SELECT id, address FROM nodes WHERE id = $1").await.map_err(pg_err)?;
        client.query_opt(&stmt, &[&id.as_uuid()]).await.map_err(pg_err)?.as_ref().map(record).transpose()
    }

    async fn expired_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached("SELECT id, address FROM nodes WHERE lease_until < clock_timestamp()")
            .await
            .map_err(pg_err)?;
        client.query(&stmt, &[]).await.map_err(pg_err)?.iter().map(record).collect()
    }

    async fn remove_expired(&self, id: NodeId) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached("DELETE FROM nodes WHERE id = $1 AND lease_until < clock_timestamp()")
            .await
            .map_err(pg_err)?;
        Ok(client.execute(&stmt, &[&id.as_uuid()]).await.map_err(pg_err)? > 0)
    }

    async fn cluster_secret(&self, candidate: &[u8]) -> Result<Vec<u8>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "WITH new AS (
                     INSERT INTO cluster_secret (id, secret) VALUES (1, $1) ON CONFLICT (id) DO NOTHING RETURNING secret
                 )
                 SELECT secret FROM new UNION ALL SELECT secret FROM cluster_secret WHERE id = 1",
            )
            .await
            .map_err(pg_err)?;
        if let Some(row) = client.query_opt(&stmt, &[&candidate]).await.map_err(pg_err)? {
            return row.try_get(0).map_err(pg_err);
        }
        // Another node stored its secret while this statement waited for it: the statement's snapshot is older than
        // that row, so it is read again by a statement of its own.
        let row = client.query_one("SELECT secret FROM cluster_secret WHERE id = 1", &[]).await.map_err(pg_err)?;
        row.try_get(0).map_err(pg_err)
    }
}
