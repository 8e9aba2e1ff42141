//! The socklens command line.

use std::process::ExitCode;

use clap::Parser;
use socklens::attach::plan::Knobs;
use socklens::cmd::Cli;

fn libbpf_to_stderr(_level: libbpf_rs::PrintLevel, msg: String) {
    eprint!("{msg}");
}

/// clap's usage errors, folded to one line (help and version print as usual).
fn parse_cli() -> Result<Cli, ExitCode> {
    Cli::try_parse().map_err(|e| {
        use clap::error::ErrorKind;
        if matches!(
            e.kind(),
            ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        ) {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        let text = e.to_string();
        let first = text.lines().next().unwrap_or("bad arguments");
        let hint = text
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("[possible values:"))
            .map(|l| format!(" {l}"))
            .unwrap_or_default();
        eprintln!("socklens: {}{hint}", first.trim_start_matches("error: "));
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    let mut cli = match parse_cli() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    cli.knobs = Knobs::from_env();
    if cli.verbose {
        libbpf_rs::set_print(Some((libbpf_rs::PrintLevel::Debug, libbpf_to_stderr)));
    } else {
        libbpf_rs::set_print(None);
    }
    match socklens::cmd::run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("socklens: {e}");
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1))
        }
    }
}
