//! For test binaries whose tests need something this machine may lack (PostgreSQL, Chromium, a Python venv):
//! declared with `harness = false` in Cargo.toml, their `main` lists the tests as [`Trial`]s and hands them to
//! [`run`]. A test whose need is missing is reported as `ignored (<what is missing>, <how to get it>)`, never as
//! `ok`; under CI (`CI` set) it fails instead, since CI must have everything. The output, the exit code and the
//! command-line arguments (a filter, `--test-threads`, `--nocapture`, `--list`, ...) are libtest's.
//!
//! ```ignore
//! fn main() -> std::process::ExitCode {
//!     use support::harness::{Flavor, run, test};
//!     run(vec![test("a_test_on_postgres", Flavor::CurrentThread, support::postgres::needed, a_test_on_postgres)])
//! }
//! ```

use libtest_mimic::{Arguments, Completion, Failed, Trial};
use std::future::Future;
use std::process::ExitCode;

/// Why a test cannot run on this machine: what is missing and how to get it.
#[derive(Clone, Debug)]
pub struct Missing(pub String);

/// What a test needs, checked when it is about to run (so that a filtered-out test starts nothing).
pub type Need = fn() -> Result<(), Missing>;

/// The tokio runtime a test body runs on, as `#[tokio::test]` (`flavor = ...`) would make it.
#[derive(Clone, Copy, Debug)]
pub enum Flavor {
    CurrentThread,
    /// Two worker threads.
    MultiThread,
}

/// Nothing: for the tests of a binary that need nothing the machine may lack.
pub fn nothing() -> Result<(), Missing> {
    Ok(())
}

/// A test named `name` that runs `body` on a runtime of `flavor` when `need` is met, and is ignored with the
/// reason otherwise (a failure under CI). A panic in `body` fails the test, as with `#[test]`.
pub fn test<F, Fut>(name: &str, flavor: Flavor, need: Need, body: F) -> Trial
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    Trial::ignorable_test(name, move || {
        if let Err(Missing(reason)) = need() {
            return if std::env::var_os("CI").is_some() {
                Err(Failed::from(format!("required under CI: {reason}")))
            } else {
                Ok(Completion::ignored_with(reason))
            };
        }
        let runtime = match flavor {
            Flavor::CurrentThread => tokio::runtime::Builder::new_current_thread().enable_all().build(),
            Flavor::MultiThread => tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build(),
        };
        runtime.map_err(|e| Failed::from(format!("no tokio runtime: {e}")))?.block_on(body());
        Ok(Completion::Completed)
    })
}

/// Like [`test`], for a body without a runtime.
pub fn sync_test(name: &str, need: Need, body: impl FnOnce() + Send + 'static) -> Trial {
    test(name, Flavor::CurrentThread, need, move || {
        body();
        std::future::ready(())
    })
}

/// Runs the trials as libtest would (arguments from the command line), then stops the services the suite
/// started for itself (a throwaway PostgreSQL).
pub fn run(trials: Vec<Trial>) -> ExitCode {
    let conclusion = libtest_mimic::run(&Arguments::from_args(), trials);
    super::postgres::stop_throwaway();
    conclusion.exit_code()
}
