//! The `bulkhead` command line, built inside the test package so integration
//! tests can run it as a real process (and kill it hard).

fn main() -> std::process::ExitCode {
    bulkhead_cli::main()
}
