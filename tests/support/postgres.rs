//! The PostgreSQL server of the suites that need one: the one at `OFFLOAD_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`, trust auth) when it answers, else a throwaway server this test
//! binary makes for itself with the machine's own `initdb` and `pg_ctl` (from `OFFLOAD_TEST_POSTGRES_BIN`, else
//! `PATH`, else the newest `/usr/lib/postgresql/*/bin`) in a temporary directory, on a free loopback port, with
//! trust auth, and stops and removes when its tests are done ([`super::harness::run`] does it). As root, the
//! throwaway server runs as the `postgres` user (PostgreSQL refuses to run as root).
//!
//! The server is found or started once per test binary, by the first test that asks for it, so a run filtered
//! to other tests starts nothing. A suite uses [`needed`] as the need of its tests and [`admin_url`] in them:
//! a URL with the rights to create and drop databases and schemas, for the suite to make its own in.

use super::harness::Missing;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

static SERVER: OnceLock<Result<String, Missing>> = OnceLock::new();
static THROWAWAY: Mutex<Option<Throwaway>> = Mutex::new(None);

/// The need of a test that uses PostgreSQL (for [`super::harness::test`]).
pub fn needed() -> Result<(), Missing> {
    admin_url().map(|_| ())
}

/// The URL of the server the tests use, found or started on the first call.
pub fn admin_url() -> Result<String, Missing> {
    SERVER.get_or_init(find_or_start).clone()
}

/// Stops and removes the throwaway server, if this binary started one.
pub fn stop_throwaway() {
    let throwaway = THROWAWAY.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
    if let Some(throwaway) = throwaway {
        throwaway.stop();
    }
}

fn find_or_start() -> Result<String, Missing> {
    // The URL may carry a password: messages name where it came from, never the URL itself.
    let (url, from) = match std::env::var("OFFLOAD_TEST_POSTGRES_URL") {
        Ok(url) => (url, "OFFLOAD_TEST_POSTGRES_URL"),
        Err(_) => (DEFAULT_URL.to_owned(), "127.0.0.1:5432"),
    };
    let unreachable = match answers(&url) {
        Ok(()) => return Ok(url),
        Err(e) => e,
    };
    match Throwaway::start() {
        Ok(throwaway) => {
            let url = throwaway.url.clone();
            eprintln!(
                "note: PostgreSQL at {from} is unreachable ({unreachable}); started a throwaway server for these tests"
            );
            *THROWAWAY.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(throwaway);
            answers(&url).map_err(|e| Missing(format!("the throwaway PostgreSQL does not answer: {e}")))?;
            Ok(url)
        }
        Err(why) => Err(Missing(format!(
            "needs PostgreSQL: nothing answers at {from} ({unreachable}) and {why} (apt-get install postgresql)"
        ))),
    }
}

/// Connects once (on a thread and runtime of its own, so that any caller may ask, async or not).
fn answers(url: &str) -> Result<(), String> {
    let url = url.to_owned();
    let attempt = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        runtime.block_on(async {
            let connect = tokio_postgres::connect(&url, tokio_postgres::NoTls);
            match tokio::time::timeout(Duration::from_secs(10), connect).await {
                Ok(Ok(_)) => Ok(()),
                // "error connecting to server: <cause>": the cause says it.
                Ok(Err(e)) => Err(std::error::Error::source(&e).map_or_else(|| e.to_string(), ToString::to_string)),
                Err(_) => Err("no answer within 10 s".to_owned()),
            }
        })
    });
    attempt.join().unwrap_or_else(|_| Err("the connection attempt panicked".to_owned()))
}

/// A server in a temporary directory, run by `pg_ctl`.
struct Throwaway {
    url: String,
    dir: PathBuf,
    bin: PathBuf,
    /// The `postgres` user's (uid, gid) when this process is root.
    user: Option<(u32, u32)>,
}

impl Throwaway {
    fn start() -> Result<Throwaway, String> {
        let bin = bin_dir().ok_or("no initdb here to start one")?;
        let root = std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
        let user =
            if root { Some(postgres_user().ok_or("running as root and there is no postgres user")?) } else { None };
        let dir = tempfile::Builder::new()
            .prefix("offload-test-postgres-")
            .tempdir()
            .map_err(|e| format!("no temporary directory: {e}"))?
            .keep();
        let throwaway = Throwaway { url: String::new(), dir, bin, user };
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&throwaway.dir, Some(uid), Some(gid)).map_err(|e| format!("chown: {e}"))?;
        }
        let started = throwaway.init_and_start();
        match started {
            Ok(url) => Ok(Throwaway { url, ..throwaway }),
            Err(e) => {
                throwaway.stop();
                Err(e)
            }
        }
    }

    fn init_and_start(&self) -> Result<String, String> {
        let data = self.dir.join("data");
        self.run("initdb", |c| {
            c.arg("-D").arg(&data).args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"])
        })?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .port();
        // Durability is not under test here: no fsync. Room for the pools of several nodes and parallel tests.
        let options = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=300",
            self.dir.display()
        );
        self.run("pg_ctl", |c| {
            c.arg("-D").arg(&data).arg("-l").arg(self.dir.join("log")).args(["-w", "-t", "60", "-o", &options, "start"])
        })?;
        Ok(format!("postgres://postgres@127.0.0.1:{port}/postgres"))
    }

    /// Runs `program` of the PostgreSQL binaries (as the `postgres` user when root) in the server's directory.
    fn run(&self, program: &str, args: impl FnOnce(&mut Command) -> &mut Command) -> Result<(), String> {
        let mut command = Command::new(self.bin.join(program));
        args(&mut command).current_dir(&self.dir).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        if let Some((uid, gid)) = self.user {
            command.uid(uid).gid(gid);
        }
        let output = command.output().map_err(|e| format!("{program} did not run: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            let log = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
            Err(format!("{program} failed: {}{log}", String::from_utf8_lossy(&output.stderr).trim()))
        }
    }

    fn stop(&self) {
        let data = self.dir.join("data");
        if data.join("postmaster.pid").exists() {
            let _ = self.run("pg_ctl", |c| c.arg("-D").arg(&data).args(["-m", "immediate", "-w", "stop"]));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Where `initdb` and `pg_ctl` are.
fn bin_dir() -> Option<PathBuf> {
    let has_both = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("OFFLOAD_TEST_POSTGRES_BIN") {
        return Some(PathBuf::from(dir)).filter(|d| has_both(d));
    }
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|dir| has_both(dir))
        // A symlink such as /usr/local/bin/initdb: the binaries are beside its target.
        .and_then(|dir| std::fs::canonicalize(dir.join("initdb")).ok()?.parent().map(Path::to_path_buf));
    on_path.or_else(|| {
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|entry| {
                let entry = entry.ok()?;
                Some((entry.file_name().to_str()?.parse().ok()?, entry.path().join("bin")))
            })
            .filter(|(_, dir)| has_both(dir))
            .collect();
        versions.sort();
        versions.pop().map(|(_, dir)| dir)
    })
}

/// The uid and gid of the `postgres` user, from /etc/passwd.
fn postgres_user() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let fields: Vec<&str> = passwd.lines().find(|line| line.starts_with("postgres:"))?.split(':').collect();
    Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?))
}

/// A database of its own for one test on the suite's server, dropped when the test ends (also when it fails).
pub struct Database {
    /// The server's admin URL, used to create and drop it.
    pub admin_url: String,
    pub name: String,
    /// The URL of this database.
    pub url: String,
}

impl Drop for Database {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop runs inside the test's runtime: the drop happens on a thread of its own.
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            runtime.block_on(async {
                if let Ok((client, connection)) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls).await {
                    tokio::spawn(connection);
                    let dropped = client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
                    if let Err(e) = dropped {
                        eprintln!("warning: could not drop the test database {name}: {e}");
                    }
                }
            });
        })
        .join();
    }
}

/// A fresh database named `<prefix>_<random>` (the tests that use it need [`needed`]).
pub async fn database(prefix: &str) -> Database {
    let admin_url = admin_url().unwrap_or_else(|missing| unreachable!("checked first: {missing:?}"));
    let (client, connection) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| unreachable!("the test server answered a moment ago: {e}"));
    tokio::spawn(connection);
    let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap_or_else(|e| unreachable!("cannot create a test database: {e}"));
    let mut url = url::Url::parse(&admin_url).unwrap_or_else(|e| unreachable!("the admin URL was used already: {e}"));
    url.set_path(&format!("/{name}"));
    Database { admin_url, name, url: url.to_string() }
}
