//! Load generation: latency histograms, the HTTP clients, the open-loop scheduler and a bounded closed-loop
//! helper.
//!
//! The open loop sends on a fixed schedule whether or not earlier requests were answered, and measures every
//! latency from the request's *scheduled* send time. A server that falls behind therefore shows up as latency
//! (and, past `max_outstanding`, as shed requests) instead of silently slowing the generator down
//! (coordinated omission).

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::Serialize;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Latencies in nanoseconds, 3 significant digits, up to 10 minutes.
pub struct Hist(Histogram<u64>);

const HIST_MAX_NS: u64 = 600_000_000_000;

impl Hist {
    pub fn new() -> Result<Self> {
        Histogram::new_with_bounds(1, HIST_MAX_NS, 3).map(Hist).context("creating a latency histogram")
    }

    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(HIST_MAX_NS).clamp(1, HIST_MAX_NS);
        // Clamped into the histogram's bounds above, so this cannot fail.
        let _ = self.0.record(ns);
    }

    pub fn add(&mut self, other: &Hist) {
        let _ = self.0.add(&other.0);
    }

    pub fn summary(&self) -> Summary {
        let us = |q: f64| if self.0.is_empty() { 0.0 } else { self.0.value_at_quantile(q) as f64 / 1000.0 };
        Summary {
            count: self.0.len(),
            mean_us: if self.0.is_empty() { 0.0 } else { self.0.mean() / 1000.0 },
            p50_us: us(0.50),
            p99_us: us(0.99),
            p999_us: us(0.999),
            max_us: if self.0.is_empty() { 0.0 } else { self.0.max() as f64 / 1000.0 },
        }
    }
}

/// Percentiles in microseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

/// An HTTP/1.1 client with keep-alive: what a web app or PHP site typically uses.
pub fn h1_client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .http1_only()
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(90))
        .build()
        .context("building the HTTP/1.1 client")
}

/// axum's HTTP/2 server allows 200 concurrent streams per connection (hyper's default), and a reqwest client
/// keeps one HTTP/2 connection per host. So many streams are spread over several clients, at most this many
/// each, leaving room on every connection for a few short requests.
pub const STREAMS_PER_H2_CONNECTION: usize = 150;

/// HTTP/2 with prior knowledge (h2c) over several connections, so that thousands of long-lived streams cost a
/// handful of sockets instead of one each. Both offload and the mock speak h2c (axum's server does).
pub struct H2Pool {
    clients: Vec<reqwest::Client>,
}

impl H2Pool {
    pub fn new(streams: usize) -> Result<Self> {
        let count = streams.div_ceil(STREAMS_PER_H2_CONNECTION).max(1);
        let clients = (0..count)
            .map(|_| {
                reqwest::Client::builder()
                    .http2_prior_knowledge()
                    .tcp_nodelay(true)
                    .pool_idle_timeout(Duration::from_secs(90))
                    .build()
                    .context("building an HTTP/2 client")
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { clients })
    }

    /// The client for stream `i`; consecutive streams go to different connections.
    pub fn get(&self, i: usize) -> &reqwest::Client {
        &self.clients[i % self.clients.len()]
    }

    pub fn connections(&self) -> usize {
        self.clients.len()
    }
}

/// Either kind of client, chosen per scenario.
pub enum Clients {
    H1(reqwest::Client),
    H2(H2Pool),
}

impl Clients {
    pub fn new(http: super::Http, streams: usize) -> Result<Self> {
        Ok(match http {
            super::Http::H1 => Clients::H1(h1_client()?),
            super::Http::H2 => Clients::H2(H2Pool::new(streams)?),
        })
    }

    pub fn get(&self, i: usize) -> &reqwest::Client {
        match self {
            Clients::H1(c) => c,
            Clients::H2(pool) => pool.get(i),
        }
    }
}

/// What one rate step of the open loop did.
#[derive(Clone, Debug, Serialize)]
pub struct StepResult {
    pub rate: u64,
    pub offered: u64,
    pub ok: u64,
    pub errors: u64,
    /// Scheduled sends skipped because `max_outstanding` requests were already waiting.
    pub shed: u64,
    /// Answers received per second over the step (scheduled window plus the drain).
    pub achieved_rps: f64,
    pub latency: Summary,
}

impl StepResult {
    /// Held: every request answered successfully and nothing shed.
    pub fn clean(&self) -> bool {
        self.errors == 0 && self.shed == 0 && self.ok == self.offered
    }
}

/// Runs one open-loop step: `rate` requests per second for `duration`. `send(i)` performs request `i` and
/// says whether it succeeded; its latency runs from its scheduled time to its completion.
pub async fn open_loop<F, Fut>(
    rate: u64,
    duration: Duration,
    max_outstanding: usize,
    drain_limit: Duration,
    send: F,
) -> Result<StepResult>
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    let offered = ((rate as f64) * duration.as_secs_f64()).round().max(1.0) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let hist = Arc::new(Mutex::new(Hist::new()?));
    let outstanding = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let send = Arc::new(send);
    let handle = tokio::runtime::Handle::current();
    let start = Instant::now() + Duration::from_millis(20);

    // The schedule runs on its own OS thread: tokio's timer has 1 ms resolution, far too coarse for
    // sub-millisecond targets; a thread sleep is accurate to tens of microseconds.
    let dispatcher = {
        let (hist, outstanding, ok, errors) = (hist.clone(), outstanding.clone(), ok.clone(), errors.clone());
        std::thread::Builder::new()
            .name("bench-open-loop".into())
            .spawn(move || {
                let mut shed = 0u64;
                for i in 0..offered {
                    let due = start + interval.mul_f64(i as f64);
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    if outstanding.load(Ordering::Acquire) >= max_outstanding {
                        shed += 1;
                        continue;
                    }
                    outstanding.fetch_add(1, Ordering::AcqRel);
                    let (hist, outstanding, ok, errors, send) =
                        (hist.clone(), outstanding.clone(), ok.clone(), errors.clone(), send.clone());
                    handle.spawn(async move {
                        let success = send(i).await;
                        let latency = due.elapsed();
                        if success {
                            hist.lock().record(latency);
                            ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                        outstanding.fetch_sub(1, Ordering::AcqRel);
                    });
                }
                shed
            })
            .context("starting the open-loop dispatcher thread")?
    };
    let shed = tokio::task::spawn_blocking(move || dispatcher.join())
        .await
        .context("waiting for the dispatcher")?
        .map_err(|_| anyhow::anyhow!("the open-loop dispatcher thread panicked"))?;
    let drain_deadline = Instant::now() + drain_limit;
    while outstanding.load(Ordering::Acquire) > 0 && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = start.elapsed();
    let unfinished = outstanding.load(Ordering::Acquire) as u64;
    let ok = ok.load(Ordering::Relaxed);
    let errors = errors.load(Ordering::Relaxed) + unfinished;
    let latency = hist.lock().summary();
    Ok(StepResult {
        rate,
        offered,
        ok,
        errors,
        shed,
        achieved_rps: ok as f64 / elapsed.as_secs_f64().max(1e-9),
        latency,
    })
}

/// Runs `f(0..n)` with at most `limit` at once (a closed loop, for ramps and sequential samples).
pub async fn bounded<F, Fut, T>(n: usize, limit: usize, f: F) -> Vec<T>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = T>,
{
    use futures_util::StreamExt;
    futures_util::stream::iter(0..n).map(f).buffer_unordered(limit.max(1)).collect().await
}

/// Finds the request labels the relay scenarios put into the mock's reply text, in any byte stream that carries
/// the chunk JSON verbatim (the mock's SSE over HTTP/1.1 or HTTP/2, offload's event stream): every content
/// word is `q<stream>x<index>`, so `"content":"q12x7 "` marks chunk 7 of stream 12.
#[derive(Default)]
pub struct LabelScanner {
    pending: Vec<u8>,
}

const LABEL_PREFIX: &[u8] = b"\"content\":\"q";

impl LabelScanner {
    /// Feeds the next bytes; calls `found(stream, index)` for every label completed by them. A label split
    /// across two pieces is found when its second half arrives.
    pub fn feed(&mut self, bytes: &[u8], mut found: impl FnMut(u32, u32)) {
        self.pending.extend_from_slice(bytes);
        let finder = memchr::memmem::Finder::new(LABEL_PREFIX);
        let mut keep_from = self.pending.len().saturating_sub(LABEL_PREFIX.len());
        let mut pos = 0;
        while let Some(offset) = finder.find(&self.pending[pos..]) {
            let start = pos + offset;
            let digits = start + LABEL_PREFIX.len();
            match parse_label(&self.pending[digits..]) {
                Some(Some((stream, index, used))) => {
                    found(stream, index);
                    pos = digits + used;
                    keep_from = keep_from.max(pos);
                }
                // Malformed: not one of ours; skip it.
                Some(None) => pos = digits,
                // Cut off: keep it for the next piece.
                None => {
                    keep_from = start;
                    break;
                }
            }
        }
        let keep_from = keep_from.min(self.pending.len());
        self.pending.drain(..keep_from);
    }
}

/// `None`: more bytes are needed. `Some(None)`: not a label. `Some(Some((stream, index, bytes used)))`.
#[allow(clippy::option_option, reason = "three outcomes: incomplete, malformed, found")]
fn parse_label(b: &[u8]) -> Option<Option<(u32, u32, usize)>> {
    let mut i = 0;
    let number = |i: &mut usize| -> Option<Option<u32>> {
        let begin = *i;
        let mut value: u32 = 0;
        while *i < b.len() && b[*i].is_ascii_digit() {
            value = value.saturating_mul(10).saturating_add(u32::from(b[*i] - b'0'));
            *i += 1;
        }
        if *i == b.len() {
            return None;
        }
        Some((*i > begin).then_some(value))
    };
    let Some(stream) = number(&mut i)? else { return Some(None) };
    if b[i] != b'x' {
        return Some(None);
    }
    i += 1;
    let Some(index) = number(&mut i)? else { return Some(None) };
    if b[i] != b' ' && b[i] != b'"' {
        return Some(None);
    }
    Some(Some((stream, index, i)))
}

/// The mock's reply text for a labelled stream: `words` words `q<stream>x0 q<stream>x1 ...`.
pub fn labels(stream: u32, words: u32) -> String {
    (0..words).map(|k| format!("q{stream}x{k}")).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_found_across_split_pieces() {
        let text = b"data: {\"delta\":{\"content\":\"q12x7 \"}}\n\ndata: {\"delta\":{\"content\":\"q12x8\"}}\n\n";
        for cut in 0..text.len() {
            let mut scanner = LabelScanner::default();
            let mut seen = Vec::new();
            scanner.feed(&text[..cut], |s, k| seen.push((s, k)));
            scanner.feed(&text[cut..], |s, k| seen.push((s, k)));
            assert_eq!(seen, vec![(12, 7), (12, 8)], "cut at {cut}");
        }
    }

    #[test]
    fn other_content_is_ignored() {
        let mut scanner = LabelScanner::default();
        let mut seen = Vec::new();
        scanner.feed(b"{\"content\":\"quick \"}{\"content\":\"q1x\"}{\"content\":\"q3x4 \"}", |s, k| seen.push((s, k)));
        assert_eq!(seen, vec![(3, 4)]);
    }

    #[test]
    fn label_text_matches_the_scanner() {
        assert_eq!(labels(5, 3), "q5x0 q5x1 q5x2");
    }
}
