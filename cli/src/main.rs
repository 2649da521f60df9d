//! The `bulkhead` binary; everything lives in this crate's library.

fn main() -> std::process::ExitCode {
    bulkhead_cli::main()
}
