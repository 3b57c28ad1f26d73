//! A headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`:
//! the browser reads commands from its fd 3 and writes replies and events to its fd 4, each a
//! JSON message ended by a NUL byte). Tests load a page straight from disk, run script in it,
//! press keys and take screenshots with no WebDriver, websocket or network port.
//!
//! The browser is Debian's `chromium` (`.ci/run` installs it where it can), or `$ZSAD_CHROMIUM`;
//! [`Browser::find`] returns `None` when there is none, and the tests say so and skip.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use serde_json::{json, Value};

/// How long one protocol command may take before the test fails (a hung browser is a failure,
/// not a stuck test).
const REPLY_LIMIT: Duration = Duration::from_secs(60);

pub struct Browser {
    child: Child,
    commands: File,
    replies: Receiver<Value>,
    next_id: u64,
    session: Option<String>,
    profile: PathBuf,
}

/// Two ends of a new pipe `(read, write)`, moved above fd 10 so that making them the child's
/// fds 3 and 4 cannot overwrite one with the other.
fn pipe() -> (RawFd, RawFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let high = |fd: RawFd| {
        // SAFETY: duplicating a descriptor we own; the original is closed right after.
        let h = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
        assert!(h >= 10);
        unsafe { libc::close(fd) };
        h
    };
    (high(fds[0]), high(fds[1]))
}

impl Browser {
    /// `$ZSAD_CHROMIUM`, else the first of chromium, chromium-browser, google-chrome on PATH.
    pub fn find() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("ZSAD_CHROMIUM") {
            return Some(PathBuf::from(p));
        }
        let path = std::env::var_os("PATH")?;
        for name in ["chromium", "chromium-browser", "google-chrome"] {
            for dir in std::env::split_paths(&path) {
                let p = dir.join(name);
                if p.is_file() {
                    return Some(p);
                }
            }
        }
        None
    }

    /// Starts a headless browser with a fresh profile (flags of a closed network: no
    /// background connections that would be refused over and over).
    pub fn launch(exe: &Path) -> Browser {
        let profile = std::env::temp_dir().join(format!(
            "zsad-chromium-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile).unwrap();
        let (cmd_read, cmd_write) = pipe();
        let (reply_read, reply_write) = pipe();
        let mut command = Command::new(exe);
        command
            .args(zsad::report::HEADLESS_CHROMIUM)
            .arg("--remote-debugging-pipe")
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: dup2 is async-signal-safe; the child gets the pipes as fds 3 and 4 (dup2
        // clears close-on-exec on the copies).
        unsafe {
            command.pre_exec(move || {
                if libc::dup2(cmd_read, 3) < 0 || libc::dup2(reply_write, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("starts chromium");
        // SAFETY: the parent's copies of the child's ends are closed; the others are ours.
        unsafe {
            libc::close(cmd_read);
            libc::close(reply_write);
        }
        let commands = unsafe { File::from_raw_fd(cmd_write) };
        let from = unsafe { File::from_raw_fd(reply_read) };
        let (tx, replies) = channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(from);
            loop {
                let mut buf = Vec::new();
                match r.read_until(0, &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        buf.pop();
                        if let Ok(v) = serde_json::from_slice::<Value>(&buf) {
                            if tx.send(v).is_err() {
                                break;
                            }
                        }
                    }
                }
            }
        });
        Browser {
            child,
            commands,
            replies,
            next_id: 1,
            session: None,
            profile,
        }
    }

    /// Sends one command (to the attached page, once there is one) and waits for its reply;
    /// events in between are dropped. A protocol error fails the test.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.commands
            .write_all(&bytes)
            .expect("chromium reads commands");
        loop {
            let v = self
                .replies
                .recv_timeout(REPLY_LIMIT)
                .unwrap_or_else(|_| panic!("chromium did not answer {method} in {REPLY_LIMIT:?}"));
            if v.get("id").and_then(Value::as_u64) == Some(id) {
                if let Some(e) = v.get("error") {
                    panic!("{method}: {e}");
                }
                return v["result"].clone();
            }
        }
    }

    /// Opens `path` (a file) in a new page of `width` x `height` CSS pixels and waits until it
    /// has loaded.
    pub fn open(&mut self, path: &Path, fragment: &str, width: u32, height: u32) {
        let target = self.call("Target.createTarget", json!({"url": "about:blank"}));
        let id = target["targetId"].as_str().unwrap().to_string();
        let attached = self.call(
            "Target.attachToTarget",
            json!({"targetId": id, "flatten": true}),
        );
        self.session = Some(attached["sessionId"].as_str().unwrap().to_string());
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        );
        let url = format!("file://{}{fragment}", path.display());
        self.call("Page.navigate", json!({"url": url}));
        self.wait_for("document.readyState === 'complete' && !!window.zsadReport");
    }

    /// Evaluates `expr` in the page (promises awaited) and returns its value; an exception
    /// fails the test.
    pub fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
        );
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expr}: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Waits (up to a minute) until `expr` is true in the page.
    pub fn wait_for(&mut self, expr: &str) {
        let deadline = std::time::Instant::now() + REPLY_LIMIT;
        loop {
            let r = self.call(
                "Runtime.evaluate",
                json!({"expression": format!("!!({expr})"), "returnByValue": true}),
            );
            if r["result"]["value"] == json!(true) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "waited a minute for {expr}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Presses and releases `key` (a DOM key name: `j`, `Enter`, `ArrowRight`, `Escape`) as
    /// real input, so the page sees the same events a person's key press makes.
    pub fn key(&mut self, key: &str) {
        let (code, vk, text): (String, i64, Option<&str>) = match key {
            "Enter" => ("Enter".into(), 13, Some("\r")),
            "Escape" => ("Escape".into(), 27, None),
            "ArrowLeft" => ("ArrowLeft".into(), 37, None),
            "ArrowUp" => ("ArrowUp".into(), 38, None),
            "ArrowRight" => ("ArrowRight".into(), 39, None),
            "ArrowDown" => ("ArrowDown".into(), 40, None),
            k if k.len() == 1 && k.as_bytes()[0].is_ascii_alphabetic() => {
                let c = k.as_bytes()[0].to_ascii_uppercase();
                (format!("Key{}", c as char), c as i64, Some(k))
            }
            "/" => ("Slash".into(), 191, Some("/")),
            other => panic!("no key {other}"),
        };
        let mut down = json!({"type": if text.is_some() { "keyDown" } else { "rawKeyDown" },
            "key": key, "code": code, "windowsVirtualKeyCode": vk});
        if let Some(t) = text {
            down["text"] = json!(t);
        }
        self.call("Input.dispatchKeyEvent", down);
        self.call(
            "Input.dispatchKeyEvent",
            json!({"type": "keyUp", "key": key, "code": code, "windowsVirtualKeyCode": vk}),
        );
    }

    /// A PNG screenshot of the page's viewport, written to `path`.
    pub fn screenshot(&mut self, path: &Path) -> Vec<u8> {
        use base64::Engine;
        let r = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, &png).unwrap();
        png
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
