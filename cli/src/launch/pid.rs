//! Is a recorded PID still the process we started? PIDs are reused (after a reboot, or
//! once enough processes came and went), so a PID alone never decides what gets signalled:
//! the process's start time and command line must match what was recorded at spawn.

use serde::{Deserialize, Serialize};

use super::process;

/// What a process was when it was started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Clock ticks after boot (/proc/<pid>/stat field 22); no two processes that ever
    /// held the same PID since boot share it.
    pub start_time: u64,
    /// Its arguments joined by spaces (/proc/<pid>/cmdline).
    pub cmdline: String,
}

/// What a recorded PID is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Now {
    /// Still the process that was recorded.
    Ours,
    /// Nothing runs under that PID (or only a zombie).
    Gone,
    /// Another process holds the PID, or nothing was recorded to tell; why, for the user.
    Other(String),
}

/// The identity of a running process; `None` if it is gone or unreadable.
pub fn identity(pid: u32) -> Option<Identity> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name in parentheses may hold spaces: fields count from after its ')'.
    // After it come field 3 (state) onwards, so field 22 is the 20th.
    let start_time = stat
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()?;
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(String::from_utf8_lossy)
        .collect::<Vec<_>>()
        .join(" ");
    Some(Identity {
        start_time,
        cmdline,
    })
}

/// Compare what runs under `pid` with what was recorded.
pub fn check(pid: u32, recorded: Option<&Identity>) -> Now {
    if !process::alive(pid) {
        return Now::Gone;
    }
    let Some(now) = identity(pid) else {
        return Now::Gone;
    };
    match recorded {
        Some(was) if *was == now => Now::Ours,
        Some(was) if was.cmdline == now.cmdline => Now::Other(format!(
            "{}, started at tick {} instead of {}",
            short(&now.cmdline),
            now.start_time,
            was.start_time
        )),
        Some(_) => Now::Other(short(&now.cmdline)),
        None => Now::Other(format!(
            "{}; the state file recorded no start time to prove it is ours",
            short(&now.cmdline)
        )),
    }
}

/// The message for a PID that is left alone.
pub fn left_alone(name: &str, pid: u32, why: &str) -> String {
    format!("pid {pid} ({name}) is now another process ({why}); left alone")
}

fn short(cmdline: &str) -> String {
    const MAX: usize = 80;
    if cmdline.is_empty() {
        return "no command line".into();
    }
    match cmdline.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &cmdline[..i]),
        None => cmdline.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_matches_itself_and_not_a_different_start() {
        let me = std::process::id();
        let id = identity(me).unwrap();
        assert!(id.start_time > 0 && !id.cmdline.is_empty());
        assert_eq!(check(me, Some(&id)), Now::Ours);
        let older = Identity {
            start_time: id.start_time - 1,
            ..id.clone()
        };
        assert!(matches!(check(me, Some(&older)), Now::Other(_)));
        let other = Identity {
            cmdline: "anvil --port 1".into(),
            ..id
        };
        assert!(matches!(check(me, Some(&other)), Now::Other(_)));
        assert!(matches!(check(me, None), Now::Other(_)));
    }
}
