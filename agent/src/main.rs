//! The `tcpstate` binary: a thin shell over the library.
use std::io::IsTerminal;
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches};
use std::io::Write;
use tcpstate::configfile;

use tcpstate::api::{Command as ApiCommand, Reply};
use tcpstate::cli::{Cli, ClientArgs, Command, LogFormat, WatchArgs};
use tcpstate::client::{self, Client};
use tracing_subscriber::EnvFilter;

/// Which agent flags were given on the command line or in their environment variable.
struct GivenFlags<'a>(&'a clap::ArgMatches);

impl configfile::Given for GivenFlags<'_> {
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
            let mut cfg = args.config();
            let mut log_level = args.log_level.clone();
            let mut log_format = args.log_format;
            let source = match configfile::load(args.config.as_deref()) {
                Ok(None) => "flags and defaults".to_string(),
                Ok(Some((path, text))) => {
                    let shown = path.display().to_string();
                    let sub = matches.subcommand_matches("agent").expect("agent");
                    let applied = configfile::parse(&shown, &text).and_then(|fc| {
                        configfile::apply(&shown, &text, &fc, &mut cfg, &GivenFlags(sub))
                    });
                    match applied {
                        Ok((level, format)) => {
                            if let Some(l) = level {
                                log_level = l;
                            }
                            if let Some(f) = format {
                                log_format = if f == "json" {
                                    LogFormat::Json
                                } else {
                                    LogFormat::Text
                                };
                            }
                            format!("{shown} and flags")
                        }
                        Err(e) => {
                            eprintln!("tcpstate: {e}");
                            return ExitCode::from(2);
                        }
                    }
                }
                Err(e) => {
                    eprintln!("tcpstate: {e}");
                    return ExitCode::from(2);
                }
            };
            if args.check_config {
                println!("configuration OK (from {source}):\n{cfg:#?}");
                return ExitCode::SUCCESS;
            }
            let filter = match EnvFilter::try_new(&log_level) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!(
                        "tcpstate: --log-level `{log_level}` is not a valid filter ({e}): use error, warn, info, debug or trace"
                    );
                    return ExitCode::from(2);
                }
            };
            let builder = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr);
            match log_format {
                LogFormat::Text => builder.init(),
                LogFormat::Json => builder.json().init(),
            }
            tcpstate::memory::tune_allocator();
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
            match runtime.block_on(tcpstate::daemon::run(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tcpstate: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Ports(args) => client_command(&args, ApiCommand::Ports, |r, colour| {
            let rows = r.ports.unwrap_or_default();
            (
                serde_json::to_string_pretty(&rows),
                client::render_ports(&rows, colour),
            )
        }),
        Command::Status(args) => client_command(&args, ApiCommand::Status, |r, _| {
            let s = r.status.unwrap_or_default();
            (serde_json::to_string_pretty(&s), client::render_status(&s))
        }),
        Command::Conns(args) => client_command(
            &args.client,
            ApiCommand::Conns {
                port: args.port,
                state: args.state.clone(),
                role: args.role.clone(),
                lingering: args.lingering,
            },
            |r, colour| {
                let rows = r.conns.unwrap_or_default();
                (
                    serde_json::to_string_pretty(&rows),
                    client::render_conns(&rows, colour),
                )
            },
        ),
        Command::Watch(args) => watch(&args),
    }
}

/// One request, one rendered reply.
fn client_command(
    args: &ClientArgs,
    command: ApiCommand,
    render: impl FnOnce(Reply, bool) -> (serde_json::Result<String>, String),
) -> ExitCode {
    let reply = match Client::connect(&args.socket).and_then(|mut c| c.ask(command)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tcpstate: {e}");
            return ExitCode::from(1);
        }
    };
    let (json, human) = render(reply, client::use_colour());
    if args.json {
        println!("{}", json.unwrap_or_default());
    } else {
        print!("{human}");
    }
    ExitCode::SUCCESS
}

fn watch(args: &WatchArgs) -> ExitCode {
    let run = || -> Result<(), client::ClientError> {
        let mut c = Client::connect(&args.client.socket)?;
        c.send(ApiCommand::Watch {
            port: args.port,
            state: args.state.clone(),
        })?;
        // The first reply says the subscription is live.
        c.next_reply()?;
        let stdout = std::io::stdout();
        while let Some(reply) = c.next_reply()? {
            if let Some(e) = reply.event {
                let line = if args.client.json {
                    serde_json::to_string(&e).unwrap_or_default()
                } else {
                    client::render_event(&e)
                };
                let mut out = stdout.lock();
                if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
                    return Ok(()); // the reader went away (a closed pipe)
                }
            }
        }
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcpstate: {e}");
            ExitCode::from(1)
        }
    }
}
