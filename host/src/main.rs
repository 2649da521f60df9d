//! The `bulkhead` binary; everything lives in the library's `cli` module.

fn main() -> std::process::ExitCode {
    bulkhead::cli::main()
}
