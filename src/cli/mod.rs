//! The command line: `offload serve`, `keys`, `usage`, `mock-upstream`, the client (`chat`, `follow`, `status`,
//! `stop`) and `completions`.

pub mod keys;
pub mod usage;

use crate::mock::MockConfig;
use crate::settings::{ServeArgs, Settings};
use crate::startup::{Application, shutdown_signal};
use crate::telemetry::LogFormat;
use clap::{CommandFactory, Parser, Subcommand};
use keys::KeysCommand;
use std::net::SocketAddr;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "offload", version, about = "Self-hosted OffloadGPT-compatible server for OpenAI Chat Completions")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server.
    Serve(Box<ServeArgs>),
    /// Manage service keys (while there are none the server runs open: on loopback, or with --allow-open).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Requests and tokens per service key, model and UTC day (the store's, all nodes').
    Usage(usage::UsageArgs),
    /// Run the built-in OpenAI-compatible mock upstream on its own.
    MockUpstream {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
        #[command(flatten)]
        defaults: MockConfig,
    },
    #[command(flatten)]
    Client(crate::client::ClientCommand),
    /// Print a shell completion script, e.g. `offload completions bash > /etc/bash_completion.d/offload`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

impl Cli {
    /// `serve` takes it from its settings (flag, environment, config file); the other commands from
    /// `OFFLOAD_LOG_FORMAT`.
    fn log_format(&self) -> LogFormat {
        match &self.command {
            Command::Serve(args) => args.log_format(),
            _ => LogFormat::from_env(),
        }
    }
}

pub async fn run() -> ExitCode {
    let cli = Cli::parse();
    let otlp = match &cli.command {
        Command::Serve(args) => args.otlp_endpoint(),
        _ => None,
    };
    let serving = matches!(cli.command, Command::Serve(_));
    let mut telemetry = crate::telemetry::init(cli.log_format(), otlp, serving);
    let result = match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::Keys(command) => keys::run(command).await,
        Command::Usage(args) => usage::run(args).await,
        Command::MockUpstream { listen, defaults } => mock_upstream(listen, defaults).await,
        // The client reports its own errors plainly on stderr (not as log lines) and picks its exit codes.
        Command::Client(command) => return crate::client::run(command).await,
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "offload", &mut std::io::stdout());
            Ok(())
        }
    };
    if let Some(tracer) = telemetry.tracer.take() {
        crate::telemetry::otel::shutdown(tracer).await;
    }
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            tracing::error!("{message}");
            ExitCode::FAILURE
        }
    };
    // The last lines are written before the process ends.
    drop(telemetry);
    code
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    let settings = Settings::resolve(args).map_err(|e| e.to_string())?;
    let app = Application::build(settings).await.map_err(|e| e.to_string())?;
    app.run_until_stopped(shutdown_signal()).await.map_err(|e| e.to_string())
}

async fn mock_upstream(listen: SocketAddr, defaults: MockConfig) -> Result<(), String> {
    let server = crate::mock::spawn(listen, defaults).await.map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    tracing::info!("mock upstream listening on {}", server.api_base());
    shutdown_signal().await;
    Ok(())
}
