//! An nginx hop in front of the mock: one unbuffered `proxy_pass` with keep-alive to the mock, the plain proxy
//! that the time-to-first-token comparison measures offload against. nginx comes from the distribution's
//! packages (`apt-get install nginx-light`); without it the comparison leaves the row out and says so.

use anyhow::{Context, Result, anyhow, bail};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// A running nginx (master process off, one worker), killed when dropped.
pub struct Nginx {
    _child: Child,
    pub addr: SocketAddr,
}

/// The nginx binary, if the machine has one.
pub fn binary() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"].into_iter().map(PathBuf::from).find(|p| p.exists())
}

impl Nginx {
    /// nginx on a free port of 127.0.0.1, proxying everything to `upstream`, its files in `dir`.
    pub async fn start(binary: &Path, dir: &Path, upstream: SocketAddr) -> Result<Self> {
        // A free port: bound, read, released (nginx binds it a moment later).
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let d = dir.display();
        let config = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
               upstream mock {{ server {upstream}; keepalive 32; }}\n\
               server {{\n    listen {addr};\n    location / {{\n      proxy_pass http://mock;\n\
                 proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_buffering off;\n\
                 proxy_request_buffering off;\n    }}\n  }}\n}}\n"
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, config).context("writing nginx.conf")?;
        let child = Command::new(binary)
            .arg("-c")
            .arg(&path)
            .arg("-p")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting nginx")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
                bail!("nginx did not listen on {addr} within 10 s: {log}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self { _child: child, addr })
    }

    /// The API base through the hop (`http://127.0.0.1:port/v1`).
    pub fn api_base(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

/// The hop, or why there is none.
pub async fn start_if_installed(dir: &Path, upstream: SocketAddr) -> Result<Nginx, String> {
    let Some(binary) = binary() else {
        return Err("nginx is not installed (apt-get install nginx-light): its row is left out".into());
    };
    std::fs::create_dir_all(dir).map_err(|e| format!("nginx's directory: {e}"))?;
    Nginx::start(&binary, dir, upstream).await.map_err(|e| format!("{:#}", anyhow!(e)))
}
