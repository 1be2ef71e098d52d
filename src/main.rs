//! The `offload` binary: everything lives in the library; see `offload --help`.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    offload::cli::run().await
}
