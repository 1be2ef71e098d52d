//! Scratch databases on the machine's PostgreSQL for the cluster scenario.
//!
//! The admin URL (`--postgres-url`) is used only to create a database of our own (`offload_bench_<random>`) and
//! to drop it again (`WITH (FORCE)`, which also ends the connections of nodes that were killed without closing
//! theirs). The nodes get the URL of the new database. A [`ScratchDb`] that is dropped without
//! [`ScratchDb::drop_now`] (an error or ctrl-c unwound the scenario) still drops its database, on a thread of its
//! own. The URL may carry a password: it is never logged, and [`redact`] hides it where the command is recorded.

use anyhow::{Context, Result, anyhow};
use std::time::Duration;
use tokio_postgres::NoTls;

/// How long to wait for a connection (an unreachable server is a skipped scenario, not a hang).
const CONNECT_LIMIT: Duration = Duration::from_secs(3);

async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio::time::timeout(CONNECT_LIMIT, tokio_postgres::connect(url, NoTls))
        .await
        .map_err(|_| anyhow!("no answer from PostgreSQL within {CONNECT_LIMIT:?}"))?
        .context("connecting to PostgreSQL")?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "a PostgreSQL connection of the bench ended");
        }
    });
    Ok(client)
}

/// Whether a PostgreSQL server answers at the admin URL (and lets us in).
pub async fn reachable(admin_url: &str) -> Result<()> {
    let client = connect(admin_url).await?;
    client.simple_query("SELECT 1").await.context("querying PostgreSQL")?;
    Ok(())
}

/// A database of our own, dropped when done.
pub struct ScratchDb {
    admin_url: String,
    name: String,
    url: String,
    dropped: bool,
}

impl ScratchDb {
    pub async fn create(admin_url: &str) -> Result<Self> {
        let mut url = url::Url::parse(admin_url).context("--postgres-url is not a URL")?;
        let name = format!("offload_bench_{}", uuid::Uuid::new_v4().simple());
        url.set_path(&format!("/{name}"));
        let client = connect(admin_url).await?;
        client.batch_execute(&format!("CREATE DATABASE {name}")).await.with_context(|| format!("creating {name}"))?;
        tracing::info!("created the scratch database {name}");
        Ok(Self { admin_url: admin_url.to_owned(), name, url: url.to_string(), dropped: false })
    }

    /// The URL the nodes use (`--store`).
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Drops the database now (the nodes on it should be stopped first; any connection left is ended).
    pub async fn drop_now(mut self) -> Result<()> {
        self.dropped = true;
        drop_database(&self.admin_url, &self.name).await
    }
}

async fn drop_database(admin_url: &str, name: &str) -> Result<()> {
    let client = connect(admin_url).await?;
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .with_context(|| format!("dropping {name}"))?;
    tracing::info!("dropped the scratch database {name}");
    Ok(())
}

impl Drop for ScratchDb {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop may run on a runtime thread (an unwinding scenario): the database is dropped from a thread and
        // runtime of its own, waited for, so that it is gone before the bench exits.
        let done = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
            let result = match runtime {
                Ok(runtime) => runtime.block_on(drop_database(&admin_url, &name)),
                Err(e) => Err(anyhow!(e).context("starting a runtime to drop the scratch database")),
            };
            if let Err(e) = result {
                tracing::warn!("could not drop the scratch database {name}: {e:#}; drop it by hand");
            }
        })
        .join();
        if done.is_err() {
            tracing::warn!("dropping the scratch database {} failed; drop it by hand", self.name);
        }
    }
}

/// Rows in offload's `events` table of a PostgreSQL store: what has been persisted.
pub async fn persisted_events(db_url: &str) -> Result<u64> {
    let client = connect(db_url).await?;
    let row = client.query_one("SELECT count(*) FROM events", &[]).await.context("counting persisted events")?;
    let count: i64 = row.get(0);
    Ok(u64::try_from(count).unwrap_or(0))
}

/// The command line with the password of any PostgreSQL URL in it replaced by `***`.
pub fn redact(arg: &str) -> String {
    let Some(start) = arg.find("postgres://").or_else(|| arg.find("postgresql://")) else {
        return arg.to_owned();
    };
    let (head, url) = arg.split_at(start);
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            // Setting a password on a URL that already has one (a host, not `cannot-be-a-base`) cannot fail.
            let _ = parsed.set_password(Some("***"));
            format!("{head}{parsed}")
        }
        Ok(_) => arg.to_owned(),
        Err(_) => format!("{head}postgres://***"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_postgres_urls_are_hidden() {
        assert_eq!(
            redact("--postgres-url=postgres://bench:s3cret@db:5432/x"),
            "--postgres-url=postgres://bench:***@db:5432/x"
        );
        assert_eq!(redact("postgresql://u:p@h/d"), "postgresql://u:***@h/d");
        assert_eq!(redact("postgres://postgres@127.0.0.1:5432/test"), "postgres://postgres@127.0.0.1:5432/test");
        assert_eq!(redact("--quick"), "--quick");
    }
}
