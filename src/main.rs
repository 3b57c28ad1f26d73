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
    // candle runs its element-wise ops on large tensors (the maps of a pass, say) on a thread
    // pool of its own whose idle workers spin 25,000 `pause`s (~1.7 ms on a Xeon) after every
    // op before they sleep; on a machine with few cores that spinning takes the CPU from
    // rayon's threads (the model) and from the decoding and encoding threads of `detect`.
    // A thousand spins (~30-70 µs) keep its latency for ops that follow each other closely.
    // Set here, first in `main` and before any other thread exists, where changing the
    // environment is sound; a value the user set is kept.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "1000");
    }
    zsad::cli::main()
}
