//! The only place in gpuops that spawns processes.
//!
//! [`CommandRunner`] is the runbook engine's door to side effects. The real
//! [`ProcessRunner`] runs an argv directly (never through a shell) in its own
//! process group with a clean environment (`PATH` and `LANG=C` only), stdin
//! closed, a timeout that kills the whole process group, and a cap on the
//! bytes kept from stdout and stderr. [`RecordingRunner`] runs nothing and
//! records what it was asked, for dry runs and tests.
//! Nothing here knows about runbooks, parameters or HTTP.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt};

pub mod resolve;

/// `PATH` given to every command.
pub const SAFE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Appended to a stream cut at the output cap.
pub const TRUNCATION_MARKER: &str = "\n[... output truncated by gpuops ...]\n";

/// One command to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandSpec {
    /// Program and arguments; `argv[0]` is looked up in [`SAFE_PATH`]
    /// (runbook steps arrive resolved to absolute paths, [`resolve`]).
    pub argv: Vec<String>,
    pub timeout: Duration,
    /// Bytes kept from each of stdout and stderr.
    pub output_cap: usize,
}

/// What a command came to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandOutput {
    /// `None` when killed by a signal (a timeout included).
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub duration: Duration,
    pub timed_out: bool,
    /// Stdout or stderr was cut at the cap.
    pub truncated: bool,
}

/// A command that could not be run at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    #[error("empty argv")]
    EmptyArgv,
    #[error("cannot start {program}: {message}")]
    Spawn { program: String, message: String },
}

/// The engine's only door to side effects.
pub trait CommandRunner: Send + Sync {
    fn run<'a>(&'a self, cmd: &'a CommandSpec) -> BoxFuture<'a, Result<CommandOutput, RunError>>;
}

/// Runs real processes.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessRunner;

impl CommandRunner for ProcessRunner {
    fn run<'a>(&'a self, cmd: &'a CommandSpec) -> BoxFuture<'a, Result<CommandOutput, RunError>> {
        Box::pin(run_process(cmd))
    }
}

/// Records every command and answers with a canned output (exit 0, empty
/// output unless set); runs nothing.
#[derive(Debug, Default)]
pub struct RecordingRunner {
    calls: Mutex<Vec<CommandSpec>>,
    reply: Mutex<CommandOutput>,
}

impl RecordingRunner {
    pub fn new() -> RecordingRunner {
        RecordingRunner {
            calls: Mutex::new(Vec::new()),
            reply: Mutex::new(CommandOutput {
                exit_code: Some(0),
                ..CommandOutput::default()
            }),
        }
    }

    /// Sets the output returned for every later call.
    pub fn reply_with(&self, out: CommandOutput) {
        *self.reply.lock().unwrap_or_else(PoisonError::into_inner) = out;
    }

    /// Commands asked for so far.
    pub fn calls(&self) -> Vec<CommandSpec> {
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl CommandRunner for RecordingRunner {
    fn run<'a>(&'a self, cmd: &'a CommandSpec) -> BoxFuture<'a, Result<CommandOutput, RunError>> {
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(cmd.clone());
        let out = self
            .reply
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        Box::pin(async move { Ok(out) })
    }
}

impl<T: CommandRunner + ?Sized> CommandRunner for Arc<T> {
    fn run<'a>(&'a self, cmd: &'a CommandSpec) -> BoxFuture<'a, Result<CommandOutput, RunError>> {
        (**self).run(cmd)
    }
}

async fn run_process(cmd: &CommandSpec) -> Result<CommandOutput, RunError> {
    let Some((program, args)) = cmd.argv.split_first() else {
        return Err(RunError::EmptyArgv);
    };
    let start = Instant::now();
    // The one sanctioned spawn in gpuops: argv only, no shell, clean env,
    // own process group (so a timeout kills grandchildren too).
    #[allow(clippy::disallowed_methods)]
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .env_clear()
        .env("PATH", SAFE_PATH)
        .env("LANG", "C")
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(|e| RunError::Spawn {
        program: program.clone(),
        message: e.to_string(),
    })?;
    let pgid = child.id();
    let cap = cmd.output_cap;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let out_buf = Arc::new(Mutex::new(Captured::default()));
    let err_buf = Arc::new(Mutex::new(Captured::default()));
    let out_task = tokio::spawn(read_capped(stdout, cap, out_buf.clone()));
    let err_task = tokio::spawn(read_capped(stderr, cap, err_buf.clone()));

    let (exit_code, timed_out) = match tokio::time::timeout(cmd.timeout, child.wait()).await {
        Ok(Ok(status)) => (status.code(), false),
        Ok(Err(e)) => {
            tracing::warn!(program = %program, error = %e, "cannot wait for command");
            kill_group(pgid);
            (None, false)
        }
        Err(_) => {
            kill_group(pgid);
            let _ = child.kill().await;
            (None, true)
        }
    };
    // The group may still hold the pipes open (a daemonised grandchild):
    // kill it, then wait briefly for the readers; a pipe held by a process
    // that left the group is abandoned with what was read so far.
    kill_group(pgid);
    let grace = Duration::from_secs(2);
    let (out_abort, err_abort) = (out_task.abort_handle(), err_task.abort_handle());
    let both = async {
        let _ = out_task.await;
        let _ = err_task.await;
    };
    if tokio::time::timeout(grace, both).await.is_err() {
        out_abort.abort();
        err_abort.abort();
        tracing::warn!(program = %program, "command output still open after it ended, abandoned");
    }
    let (stdout, out_cut) = take_captured(&out_buf);
    let (stderr, err_cut) = take_captured(&err_buf);
    Ok(CommandOutput {
        exit_code,
        stdout,
        stderr,
        duration: start.elapsed(),
        timed_out,
        truncated: out_cut || err_cut,
    })
}

fn kill_group(pgid: Option<u32>) {
    let Some(pid) = pgid
        .and_then(|p| i32::try_from(p).ok())
        .and_then(rustix::process::Pid::from_raw)
    else {
        return;
    };
    // ESRCH (the group is gone) is the common, harmless case.
    let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
}

#[derive(Default)]
struct Captured {
    kept: Vec<u8>,
    cut: bool,
}

/// Reads a stream to its end into `into`, keeping at most `cap` bytes; the
/// rest is drained and discarded so the writer never blocks.
async fn read_capped<R: AsyncRead + Unpin>(
    stream: Option<R>,
    cap: usize,
    into: Arc<Mutex<Captured>>,
) {
    let Some(mut stream) = stream else {
        return;
    };
    let mut buf = vec![0u8; 8192];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let mut c = into.lock().unwrap_or_else(PoisonError::into_inner);
                let room = cap.saturating_sub(c.kept.len());
                if n > room {
                    c.cut = true;
                }
                c.kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

/// The captured text (lossy UTF-8, with the marker when cut) and whether it was cut.
fn take_captured(c: &Mutex<Captured>) -> (String, bool) {
    let c = c.lock().unwrap_or_else(PoisonError::into_inner);
    let mut text = String::from_utf8_lossy(&c.kept).into_owned();
    if c.cut {
        text.push_str(TRUNCATION_MARKER);
    }
    (text, c.cut)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(argv: &[&str], timeout_ms: u64, cap: usize) -> CommandSpec {
        CommandSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            timeout: Duration::from_millis(timeout_ms),
            output_cap: cap,
        }
    }

    #[tokio::test]
    async fn runs_argv_without_shell_and_clean_env() {
        let out = ProcessRunner
            .run(&spec(&["echo", "a; rm -rf /", "$(id)"], 5000, 1024))
            .await
            .unwrap();
        assert_eq!(out.exit_code, Some(0));
        assert_eq!(out.stdout, "a; rm -rf / $(id)\n");
        let env = ProcessRunner
            .run(&spec(&["env"], 5000, 4096))
            .await
            .unwrap();
        let mut lines: Vec<&str> = env.stdout.lines().collect();
        lines.sort();
        assert_eq!(lines, vec!["LANG=C", &format!("PATH={SAFE_PATH}")]);
    }

    #[tokio::test]
    async fn timeout_kills_the_process_group() {
        let out = ProcessRunner
            .run(&spec(&["sleep", "30"], 200, 1024))
            .await
            .unwrap();
        assert!(out.timed_out);
        assert_eq!(out.exit_code, None);
        assert!(out.duration < Duration::from_secs(5), "{:?}", out.duration);
    }

    #[tokio::test]
    async fn output_is_capped_with_a_marker() {
        let out = ProcessRunner
            .run(&spec(&["seq", "1", "1000000"], 10_000, 100))
            .await
            .unwrap();
        assert_eq!(out.exit_code, Some(0));
        assert!(out.truncated);
        assert!(out.stdout.starts_with("1\n2\n3\n"));
        assert_eq!(out.stdout.len(), 100 + TRUNCATION_MARKER.len());
        assert!(out.stdout.ends_with(TRUNCATION_MARKER));
    }

    #[tokio::test]
    async fn endless_output_is_capped_and_timed_out() {
        let out = ProcessRunner
            .run(&spec(&["yes", "gpuops"], 300, 100))
            .await
            .unwrap();
        assert!(out.timed_out);
        assert!(out.truncated);
        assert!(out.stdout.starts_with("gpuops\ngpuops\n"));
        assert_eq!(out.stdout.len(), 100 + TRUNCATION_MARKER.len());
    }

    #[tokio::test]
    async fn a_process_escaping_the_group_cannot_hold_the_step_open() {
        // setsid -f: the child leaves our process group and keeps stdout open.
        let start = Instant::now();
        let out = ProcessRunner
            .run(&spec(&["setsid", "-f", "sleep", "10"], 5000, 100))
            .await
            .unwrap();
        assert_eq!(out.exit_code, Some(0));
        assert!(!out.timed_out);
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn missing_program_is_a_spawn_error() {
        let err = ProcessRunner
            .run(&spec(&["gpuops-no-such-program"], 1000, 10))
            .await
            .unwrap_err();
        assert!(matches!(err, RunError::Spawn { .. }), "{err}");
    }
}
