//! The `tcpstate` client commands: each sends one request over the local API and renders the
//! reply. Uses only the API protocol ([`crate::serve::api::protocol`]).
use std::io::Write;
use std::process::ExitCode;

use crate::serve::api::protocol::{Command, Reply};

pub mod args;
pub(crate) mod client;
pub mod doctor;
pub(crate) mod render;

use args::{ClientArgs, ConnsArgs, WatchArgs};
use client::{Client, ClientError};

/// `tcpstate ports`.
pub fn ports(args: &ClientArgs) -> ExitCode {
    one_request(args, Command::Ports, |r, colour| {
        let rows = r.ports.unwrap_or_default();
        (
            serde_json::to_string_pretty(&rows),
            render::ports(&rows, colour),
        )
    })
}

/// `tcpstate status`.
pub fn status(args: &ClientArgs) -> ExitCode {
    one_request(args, Command::Status, |r, _| {
        let s = r.status.unwrap_or_default();
        (serde_json::to_string_pretty(&s), render::status(&s))
    })
}

/// `tcpstate conns`.
pub fn conns(args: &ConnsArgs) -> ExitCode {
    let command = Command::Conns {
        port: args.port,
        state: args.state,
        role: args.role,
        lingering: args.lingering,
    };
    one_request(&args.client, command, |r, colour| {
        let rows = r.conns.unwrap_or_default();
        (
            serde_json::to_string_pretty(&rows),
            render::conns(&rows, colour),
        )
    })
}

/// One request, one rendered reply.
fn one_request(
    args: &ClientArgs,
    command: Command,
    show: impl FnOnce(Reply, bool) -> (serde_json::Result<String>, String),
) -> ExitCode {
    let reply = match Client::connect(&args.socket).and_then(|mut c| c.ask(command)) {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    let (json, human) = show(reply, render::use_colour());
    if args.json {
        println!("{}", json.unwrap_or_default());
    } else {
        print!("{human}");
    }
    ExitCode::SUCCESS
}

/// `tcpstate watch`: one line per transition until interrupted or the reader goes away.
pub fn watch(args: &WatchArgs) -> ExitCode {
    let run = || -> Result<(), ClientError> {
        let mut c = Client::connect(&args.client.socket)?;
        c.send(Command::Watch {
            port: args.port,
            state: args.state,
        })?;
        // The first reply says the subscription is live: say so on stderr (stdout stays the
        // events alone), so that a person, or a script, knows from when on nothing is missed.
        c.next_reply()?;
        eprintln!("tcpstate: watching; every transition from now on (Ctrl-C stops)");
        let stdout = std::io::stdout();
        while let Some(reply) = c.next_reply()? {
            if let Some(e) = reply.event {
                let line = if args.client.json {
                    serde_json::to_string(&e).unwrap_or_default()
                } else {
                    render::event(&e)
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
        Err(e) => fail(&e),
    }
}

pub(crate) fn fail(e: &ClientError) -> ExitCode {
    eprintln!("tcpstate: {e}");
    ExitCode::from(1)
}
