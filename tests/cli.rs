//! The command line against a reader that stops early (`dtta inspect ... | head -1`):
//! a closed stdout ends the command quietly, without a panic.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};

use common::{demo_bundle, dtta, repo, text};

/// Runs dtta with stdout a pipe whose read end is closed before dtta starts, so its
/// first write fails with EPIPE; returns the exit status and stderr.
fn with_closed_stdout(args: &[&str]) -> (ExitStatus, String) {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    let child = dtta()
        .args(args)
        .current_dir(repo())
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .expect("dtta starts");
    let out = child.wait_with_output().expect("dtta runs");
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Each command prints something to an open stdout, and exits cleanly (0, or 141 /
/// SIGPIPE) with nothing panicking when stdout is closed.
fn quiet_on_closed_pipe(args: &[&str]) {
    let open = dtta().args(args).current_dir(repo()).output().expect("dtta runs");
    assert!(open.status.success() && !open.stdout.is_empty(), "{}", text(&open));
    let (status, stderr) = with_closed_stdout(args);
    assert!(
        status.success() || status.code() == Some(141) || status.signal() == Some(13),
        "dtta {args:?} with a closed stdout: {status:?}\n{stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
        "dtta {args:?} with a closed stdout:\n{stderr}"
    );
}

#[test]
fn inspect_into_a_closed_pipe_exits_quietly() {
    quiet_on_closed_pipe(&["inspect", demo_bundle().to_str().unwrap(), "--device", "cpu"]);
}

#[test]
fn plan_into_a_closed_pipe_exits_quietly() {
    let out = tempfile::tempdir().unwrap();
    let set = format!("output.url={}/", out.path().display());
    quiet_on_closed_pipe(&["plan", "pipelines/demo.toml", "--set", &set]);
}

#[test]
fn summarize_into_a_closed_pipe_exits_quietly() {
    let out = tempfile::tempdir().unwrap();
    quiet_on_closed_pipe(&["summarize", &format!("{}/", out.path().display())]);
}
