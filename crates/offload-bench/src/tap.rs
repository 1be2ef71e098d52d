//! The tap: a byte-for-byte TCP proxy in the bench process, placed between a client (offload, or the bench's
//! own direct reader) and the mock. It notes the instant it hands each labelled chunk to the client's socket.
//!
//! That instant is "the upstream wrote the chunk", on the bench's own monotonic clock, so a reader in the bench
//! can subtract it from its receive instant exactly; the mock's timer jitter (tokio sleeps have 1 ms resolution)
//! and the mock-to-tap hop stay outside the measured interval, for offload and for the direct floor alike.

use super::load::LabelScanner;
use anyhow::{Context, Result};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// When the tap wrote chunk `(stream, index)` to its client.
pub type Marks = Arc<Mutex<HashMap<(u32, u32), Instant>>>;

pub struct Tap {
    pub addr: SocketAddr,
    pub marks: Marks,
    task: tokio::task::JoinHandle<()>,
}

impl Tap {
    pub async fn start(target: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("binding the tap")?;
        let addr = listener.local_addr().context("the tap's address")?;
        let marks: Marks = Arc::default();
        let shared = marks.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let marks = shared.clone();
                tokio::spawn(async move {
                    if let Err(e) = relay(client, target, marks).await {
                        tracing::debug!(error = %e, "tap connection ended");
                    }
                });
            }
        });
        Ok(Self { addr, marks, task })
    }

    /// The API base to hand to offload (`--upstream-url`) or to call directly.
    pub fn api_base(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn mark(&self, stream: u32, index: u32) -> Option<Instant> {
        self.marks.lock().get(&(stream, index)).copied()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(client: TcpStream, target: SocketAddr, marks: Marks) -> Result<()> {
    client.set_nodelay(true).context("nodelay")?;
    let upstream = TcpStream::connect(target).await.context("connecting to the mock")?;
    upstream.set_nodelay(true).context("nodelay")?;
    let (mut client_read, mut client_write) = client.into_split();
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    let requests = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_read, &mut upstream_write).await;
        let _ = upstream_write.shutdown().await;
    });
    let mut scanner = LabelScanner::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut found = Vec::new();
    loop {
        let n = upstream_read.read(&mut buf).await.context("reading from the mock")?;
        if n == 0 {
            break;
        }
        scanner.feed(&buf[..n], |s, k| found.push((s, k)));
        // Taken before the write: a reader on the other end may wake and read before this task runs again, so
        // a timestamp after the write could be later than the receive instant.
        let now = Instant::now();
        client_write.write_all(&buf[..n]).await.context("writing to the client")?;
        if !found.is_empty() {
            let mut marks = marks.lock();
            for key in found.drain(..) {
                marks.insert(key, now);
            }
        }
    }
    let _ = client_write.shutdown().await;
    requests.abort();
    Ok(())
}
