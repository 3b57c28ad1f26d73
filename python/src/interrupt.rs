//! Long calls with the GIL released and Ctrl-C honoured: the job runs on a worker thread while
//! the calling thread waits without the GIL, waking every 50 ms to let Python run its signal
//! handlers (`py.check_signals()`). A `KeyboardInterrupt` there asks the job to stop
//! (`zsad::progress::request_stop`: it finishes what is in flight, writes it, and returns),
//! waits for it, and is raised.

use std::sync::mpsc;
use std::time::Duration;

use pyo3::exceptions::PyKeyboardInterrupt;
use pyo3::prelude::*;

/// How often the waiting thread lets Python handle signals.
const POLL: Duration = Duration::from_millis(50);

/// Runs `job` on a worker thread with the GIL released; its error becomes the Python
/// exception that stands for it, a panic a `ZsadError`, and Ctrl-C a `KeyboardInterrupt`.
pub fn interruptible<T, F>(py: Python<'_>, job: F) -> PyResult<T>
where
    T: Send,
    F: FnOnce() -> zsad::Result<T> + Send,
{
    zsad::progress::clear_stop();
    let (outcome, interrupted) = std::thread::scope(|s| {
        let (tx, mut rx) = mpsc::channel::<()>();
        let handle = s.spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            let _ = tx.send(());
            r
        });
        let mut interrupted: Option<PyErr> = None;
        loop {
            let (waited, back) = py.allow_threads(move || (rx.recv_timeout(POLL), rx));
            rx = back;
            // Also when the job is done: a Ctrl-C during a short call (one pass of a
            // `detect_batch`) is raised as it ends, not lost in the next.
            if interrupted.is_none() {
                if let Err(e) = py.check_signals() {
                    // The job sees the request between passes and returns what it finished.
                    zsad::progress::request_stop();
                    interrupted = Some(e);
                }
            }
            if !matches!(waited, Err(mpsc::RecvTimeoutError::Timeout)) {
                break;
            }
        }
        let joined = py.allow_threads(move || handle.join());
        (joined, interrupted)
    });
    zsad::progress::clear_stop();
    let result = match outcome {
        Ok(Ok(r)) => r,
        Ok(Err(panic)) | Err(panic) => {
            let text = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".into());
            return Err(crate::errors::exception(
                py,
                "ZsadError",
                format!("internal error (a bug in zsad, please report it): {text}"),
                None,
            ));
        }
    };
    match (interrupted, result) {
        // What the job kept, when it says.
        (Some(_), Err(e @ zsad::Error::Interrupted { .. })) => {
            Err(PyKeyboardInterrupt::new_err(crate::errors::message(&e)))
        }
        (Some(e), _) => Err(e),
        (None, r) => r.map_err(|e| crate::errors::to_py(py, e)),
    }
}
