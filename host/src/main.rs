use std::process::ExitCode;

fn main() -> ExitCode {
    match gocp_host::cli::run() {
        Ok(code) => code,
        Err(e) => {
            // One line: stderr is the user's build output.
            eprintln!("gocp: {e:#}");
            ExitCode::from(2)
        }
    }
}
