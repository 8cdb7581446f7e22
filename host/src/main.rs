//! The `jobhost` binary; everything lives in [`jobhost::cli`].

fn main() -> std::process::ExitCode {
    jobhost::cli::main()
}
