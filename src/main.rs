use std::process::ExitCode;

fn main() -> ExitCode {
    zsad::cli::main()
}
