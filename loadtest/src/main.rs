//! petrel-bench: see the crate docs of `petrel_loadtest` and `petrel-bench --help`.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = petrel_loadtest::Cli::parse();
    match petrel_loadtest::main_with(cli) {
        Ok(0) => std::process::ExitCode::SUCCESS,
        Ok(code) => std::process::ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("petrel-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
