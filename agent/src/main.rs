//! The `tcpstate` binary: parses the command line and hands over to the agent or a client
//! command of the library.
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches};
use tcpstate::args::{Cli, Command};
use tcpstate::config::file::{self, Given};

/// Which agent flags were given on the command line or in their environment variable.
struct GivenFlags<'a>(&'a clap::ArgMatches);

impl Given for GivenFlags<'_> {
    fn given(&self, flag: &str) -> bool {
        matches!(
            self.0.value_source(&flag.replace('-', "_")),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    }
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match cli.command {
        Command::Agent(args) => {
            let sub = matches.subcommand_matches("agent").expect("agent");
            let resolved = match file::resolve(&args, &GivenFlags(sub)) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("tcpstate: {e}");
                    return ExitCode::from(2);
                }
            };
            if args.check_config {
                println!(
                    "configuration OK (from {}):\n{:#?}",
                    resolved.source, resolved.config
                );
                return ExitCode::SUCCESS;
            }
            tcpstate::agent::main(resolved.config, &resolved.log_level, resolved.log_format)
        }
        Command::Ports(args) => tcpstate::cli::ports(&args),
        Command::Status(args) => tcpstate::cli::status(&args),
        Command::Conns(args) => tcpstate::cli::conns(&args),
        Command::Watch(args) => tcpstate::cli::watch(&args),
        Command::Doctor(args) => tcpstate::cli::doctor::doctor(&args),
    }
}
