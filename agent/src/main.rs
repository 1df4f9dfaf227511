//! The `tcpstate` binary: a thin shell over the library.
use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tcpstate::cli::{Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Agent(args) => {
            let filter = match EnvFilter::try_new(&args.log_level) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!(
                        "tcpstate: --log-level `{}` is not a valid filter ({e}): use error, warn, info, debug or trace",
                        args.log_level
                    );
                    return ExitCode::from(2);
                }
            };
            let builder = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr);
            match args.log_format {
                LogFormat::Text => builder.init(),
                LogFormat::Json => builder.json().init(),
            }
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("tcpstate: cannot start the async runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            match runtime.block_on(tcpstate::daemon::run(args.config())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tcpstate: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
