//! The `offload` binary: everything lives in the library; see `offload --help`.

/// jemalloc keeps its bookkeeping outside the blocks it hands out, so the pages of a buffer that was reserved but
/// never written (hyper's per-connection read buffer under an idle event-stream reader, say) stay out of RSS.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    offload::cli::run().await
}
