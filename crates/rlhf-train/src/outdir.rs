//! What guards a run's `output_dir` before anything is written into it:
//!
//! - a lock: `output_dir/.rlhf.lock` holds the owner's pid and host, taken when the run starts
//!   and removed when it ends (the [`OutputLock`] is dropped), so a second run into the same
//!   directory fails at once naming the holder. A lock whose process is gone (same host, pid no
//!   longer alive) is taken over with a warning; one from another host is never presumed dead.
//! - no clobbering: a fresh run (no `--resume`) into a directory holding another run's
//!   checkpoints refuses unless `overwrite_output_dir = true`, which deletes them (and the old
//!   `metrics.jsonl`) first, so a later `--resume` never mixes two runs.
//! - no writing into the input: `output_dir` may not be the model directory nor lie inside it.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The lock file's name in `output_dir`.
pub const LOCK_FILE: &str = ".rlhf.lock";

/// What a lock file holds.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Owner {
    pid: u32,
    host: String,
}

/// A held `output_dir` lock; dropping it removes the lock file (when it is still ours).
#[derive(Debug)]
pub struct OutputLock {
    path: PathBuf,
    owner: Owner,
}

impl OutputLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Only our own lock: a lock taken over by another run after ours was judged stale
        // (it cannot be while we live, but a copy of the directory can be) stays.
        if read_owner(&self.path).as_ref() == Some(&self.owner) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// This machine's host name.
fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

/// Whether process `pid` exists on this machine.
fn alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // A zombie (killed, not yet reaped: a rank of a data-parallel job killed with its
    // launcher) holds nothing any more.
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        if stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        {
            return false;
        }
    }
    // SAFETY: signal 0 sends nothing; it only asks whether the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn read_owner(path: &Path) -> Option<Owner> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// Takes `output_dir`'s lock (creating the directory), or fails naming the process that holds
/// it. A lock left by a process that no longer runs on this host is taken over with a warning.
pub fn lock(output_dir: &Path) -> Result<OutputLock> {
    std::fs::create_dir_all(output_dir).map_err(|e| Error::io(output_dir, e))?;
    let path = output_dir.join(LOCK_FILE);
    let owner = Owner {
        pid: std::process::id(),
        host: host(),
    };
    let text = serde_json::to_string(&owner).expect("owner serialises") + "\n";
    // Written whole under a private name, then linked to the lock's name: the link fails when
    // the lock exists, so no reader ever sees a half-written lock.
    let tmp = output_dir.join(format!("{LOCK_FILE}.{}", owner.pid));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()
    };
    write().map_err(|e| Error::io(&tmp, e))?;
    let result = take(&path, &tmp, &owner);
    let _ = std::fs::remove_file(&tmp);
    result?;
    Ok(OutputLock { path, owner })
}

fn take(path: &Path, tmp: &Path, me: &Owner) -> Result<()> {
    for _ in 0..3 {
        match std::fs::hard_link(tmp, path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io(path, e)),
        }
        let holder = read_owner(path);
        match holder {
            Some(h) if h.host == me.host && h.pid != me.pid && !alive(h.pid) => {
                tracing::warn!(
                    "{}: taking over a stale lock of pid {} on {} (no such process: that run \
                     ended without releasing it)",
                    path.display(),
                    h.pid,
                    h.host
                );
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io(path, e)),
                }
            }
            Some(h) => {
                let dir = path.parent().unwrap_or(Path::new("."));
                return Err(Error::Config(format!(
                    "output_dir {} is in use by another run (pid {} on {}, lock file {}): wait \
                     for it to finish or choose another output_dir; if that process is gone, \
                     delete the lock file",
                    dir.display(),
                    h.pid,
                    h.host,
                    path.display()
                )));
            }
            None => {
                return Err(Error::Config(format!(
                    "{}: a lock file that does not name its owner (expected {{\"pid\", \
                     \"host\"}}): if no other run uses this output_dir, delete it",
                    path.display()
                )))
            }
        }
    }
    Err(Error::Config(format!(
        "{}: could not take the lock (another run keeps taking it)",
        path.display()
    )))
}

/// The entries of `output_dir` that belong to a run: `checkpoint-N` (and their temporary
/// `.checkpoint-N.tmp`), rejection sampling's `iteration-N`, ReST's `grow-N`, and the
/// pipeline's `pipeline_state.json`. Sorted.
pub fn run_entries(output_dir: &Path) -> Vec<PathBuf> {
    let numbered = |name: &str, prefix: &str| {
        name.strip_prefix(prefix)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    let mut v: Vec<PathBuf> = std::fs::read_dir(output_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let tmp = name
                .strip_prefix('.')
                .and_then(|n| n.strip_suffix(".tmp"))
                .is_some_and(|n| numbered(n, "checkpoint-"));
            tmp || name == "pipeline_state.json"
                || ["checkpoint-", "iteration-", "grow-"]
                    .iter()
                    .any(|p| numbered(&name, p))
        })
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

/// `path` made absolute with `.` and `..` resolved, following links where it exists (a path
/// that does not exist yet is resolved through its nearest existing ancestor).
fn resolved(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut tail = Vec::new();
    let mut cur = abs.as_path();
    loop {
        if let Ok(c) = cur.canonicalize() {
            let mut out = c;
            for t in tail.iter().rev() {
                match t {
                    std::path::Component::ParentDir => {
                        out.pop();
                    }
                    std::path::Component::CurDir => {}
                    c => out.push(c.as_os_str()),
                }
            }
            return out;
        }
        match (cur.parent(), cur.components().next_back()) {
            (Some(p), Some(c)) => {
                tail.push(c);
                cur = p;
            }
            _ => return abs,
        }
    }
}

/// Refuses an `output_dir` that is `model` (a directory a run reads) or lies inside it.
pub fn check_not_input(output_dir: &Path, key: &str, model: &Path) -> Result<()> {
    if !model.is_dir() {
        // A hub name or a missing directory: loading it says what is wrong.
        return Ok(());
    }
    let (out, m) = (resolved(output_dir), resolved(model));
    if out.starts_with(&m) {
        let how = if out == m { "is" } else { "lies inside" };
        return Err(Error::Config(format!(
            "output_dir {} {how} the `{key}` directory {}: a run never writes into the model \
             it reads; choose another output_dir",
            output_dir.display(),
            model.display()
        )));
    }
    Ok(())
}

/// Everything a run checks and takes before it writes into `output_dir`: that it is not one of
/// the `inputs` (key, model directory) nor inside one, the lock, and, for a fresh run
/// (`resuming` false), that the directory holds no other run's checkpoints (deleted first when
/// `overwrite`). Keep the returned lock alive for the whole run.
pub fn prepare(
    output_dir: &Path,
    inputs: &[(&str, &Path)],
    resuming: bool,
    overwrite: bool,
) -> Result<OutputLock> {
    for (key, model) in inputs {
        check_not_input(output_dir, key, model)?;
    }
    let lock = lock(output_dir)?;
    if resuming {
        return Ok(lock);
    }
    let old = run_entries(output_dir);
    if old.is_empty() {
        return Ok(lock);
    }
    let names: Vec<String> = old
        .iter()
        .take(4)
        .map(|p| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let more = if old.len() > 4 {
        format!(" and {} more", old.len() - 4)
    } else {
        String::new()
    };
    if !overwrite {
        return Err(Error::Config(format!(
            "output_dir {} holds an earlier run ({}{more}): pass --resume to continue it, set \
             overwrite_output_dir = true to delete it and start afresh, or choose another \
             output_dir",
            output_dir.display(),
            names.join(", ")
        )));
    }
    tracing::warn!(
        "overwrite_output_dir: deleting the earlier run in {} ({}{more}, metrics.jsonl)",
        output_dir.display(),
        names.join(", ")
    );
    for p in old {
        let r = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.map_err(|e| Error::io(&p, e))?;
    }
    let metrics = output_dir.join(crate::metrics::METRICS_FILE);
    if metrics.exists() {
        std::fs::remove_file(&metrics).map_err(|e| Error::io(&metrics, e))?;
    }
    Ok(lock)
}

/// What a trainer holds while it runs: the output directory's lock and, with `bf16 = true`,
/// bf16 autocast ([`rlhf_model::kernels::Autocast`]); both end when it is dropped.
pub struct RunGuard {
    /// Rank 0's lock on the output directory (other ranks of a data-parallel job hold none).
    _lock: Option<OutputLock>,
    _precision: rlhf_model::kernels::Autocast,
}

/// [`prepare`] for a trainer: `args.output_dir`, which may not be `args.model` (nor the other
/// model directories in `inputs`), `overwrite_output_dir` from `args`; then the precision
/// `args.bf16` asks for, for the rest of the run (training, evaluation and generation alike,
/// as accelerate's autocast wraps every forward).
pub fn prepare_run(
    args: &crate::config::TrainingArgs,
    inputs: &[(&str, &Path)],
    resuming: bool,
) -> Result<RunGuard> {
    let mut all: Vec<(&str, &Path)> = vec![("model", args.model.as_path())];
    all.extend_from_slice(inputs);
    // In a data-parallel job rank 0 checks, clears and locks the directory it alone writes;
    // the others wait for it (an error there ends the job: see the binary's `main`).
    let world = crate::dist::world();
    let lock = if world.rank() == 0 {
        Some(prepare(
            &args.output_dir,
            &all,
            resuming,
            args.overwrite_output_dir,
        )?)
    } else {
        None
    };
    world.barrier();
    if args.bf16 {
        tracing::info!("{}", rlhf_model::kernels::cpu::gemm::autocast_kernel());
    }
    Ok(RunGuard {
        _lock: lock,
        _precision: rlhf_model::kernels::Autocast::bf16(args.bf16),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_is_refused_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let l = lock(dir.path()).unwrap();
        assert!(l.path().exists());
        let err = lock(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(l);
        assert!(!dir.path().join(LOCK_FILE).exists());
        let _again = lock(dir.path()).unwrap();
    }

    #[test]
    fn a_lock_from_another_host_is_never_presumed_dead() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(LOCK_FILE),
            "{\"pid\": 4000000, \"host\": \"elsewhere\"}",
        )
        .unwrap();
        let err = lock(dir.path()).unwrap_err().to_string();
        assert!(err.contains("pid 4000000 on elsewhere"), "{err}");
    }

    #[test]
    fn run_entries_are_checkpoints_rounds_and_pipeline_state() {
        let dir = tempfile::tempdir().unwrap();
        for d in [
            "checkpoint-2",
            ".checkpoint-4.tmp",
            "iteration-1",
            "grow-3",
            "checkpoint-x",
            "runs",
            "sft",
        ] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        std::fs::write(dir.path().join("pipeline_state.json"), "{}").unwrap();
        let names: Vec<String> = run_entries(dir.path())
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                ".checkpoint-4.tmp",
                "checkpoint-2",
                "grow-3",
                "iteration-1",
                "pipeline_state.json"
            ]
        );
    }

    #[test]
    fn output_inside_the_model_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("m");
        std::fs::create_dir_all(&m).unwrap();
        assert!(check_not_input(&m, "model", &m).is_err());
        assert!(check_not_input(&m.join("a/b"), "model", &m).is_err());
        assert!(check_not_input(&dir.path().join("m/../m"), "model", &m).is_err());
        assert!(check_not_input(&dir.path().join("m2"), "model", &m).is_ok());
        assert!(check_not_input(&m.join("../out"), "model", &m).is_ok());
    }
}
