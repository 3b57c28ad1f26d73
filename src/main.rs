use std::process::ExitCode;

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, so printing to a closed pipe (`zsad eval ... | head -1`) would be an
    // error on every `println!`, which panics. Restore the Unix default instead: the process
    // ends quietly when its reader has gone, as `cat` or `grep` do (exit status 128 + 13 in a
    // shell). Records and maps are written atomically or resumably, so nothing written is torn.
    #[cfg(unix)]
    // SAFETY: called first in `main`, before any other thread exists; setting a signal's
    // disposition to SIG_DFL installs no handler code.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    zsad::cli::main()
}
