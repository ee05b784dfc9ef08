//! A scratch directory per fuzzing process (on /dev/shm where it exists: the readers under test
//! take paths, so each input is written to a file first, as a user's file would be).

use std::path::PathBuf;

/// This process's scratch directory, created once.
pub fn dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let d = base.join(format!("rlhf-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("scratch dir");
        d
    })
    .clone()
}

/// Writes `data` to `name` in the scratch directory and returns its path.
#[allow(dead_code)] // not every target writes a single file
pub fn file(name: &str, data: &[u8]) -> PathBuf {
    let p = dir().join(name);
    std::fs::write(&p, data).expect("scratch write");
    p
}
