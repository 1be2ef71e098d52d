//! Shared by the test binaries. This file: for the tests that run the real `offload` binary, start it on port 0,
//! learn its address from its log, and kill it (SIGKILL) when the test is done with it, also when the test fails.
//! `harness`: test binaries whose tests may need what the machine lacks, reported as ignored with the reason.
//! `postgres`: the PostgreSQL server of the suites that need one, reachable or throwaway.
//! `cluster`: what the cluster suites ask of their nodes.

#![allow(dead_code, reason = "each test crate uses the part it needs")]

pub mod cluster;
pub mod harness;
pub mod postgres;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running `offload` process.
pub struct Offload {
    pub child: Child,
    /// `host:port` it listens on.
    pub addr: String,
    /// Its log lines (stderr) not read yet.
    pub log: mpsc::Receiver<String>,
}

impl Offload {
    /// `offload <args>`, as built for the tests (`configure` may add arguments and environment).
    pub fn command() -> Command {
        Command::new(env!("CARGO_BIN_EXE_offload"))
    }

    /// Runs `command` (an `offload serve ... --listen 127.0.0.1:0`, possibly wrapped) and waits until it says
    /// where it listens.
    #[expect(clippy::zombie_processes, reason = "the child is owned by `Offload`, whose Drop kills and waits for it")]
    pub fn spawn(mut command: Command) -> Offload {
        let mut child = command.stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| unreachable!("offload did not start within 30 s"));
            if let Some(rest) = line.split(" listening on ").nth(1)
                && !line.contains("mock upstream")
            {
                let addr = rest.split_whitespace().next().unwrap().to_owned();
                return Offload { child, addr, log: rx };
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The log lines written since the last call.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.try_iter().collect()
    }

    /// SIGKILL, and wait until it is gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Offload {
    fn drop(&mut self) {
        self.kill();
    }
}
