//! Starting the app in-process on a free loopback port, and a database to label.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rlhf_feedback::server::{serve, ServeOptions};
use rlhf_feedback::store::{NewItem, Project, Store};
use rlhf_feedback::Kind;
use serde_json::{json, Map, Value};

/// A running app; stopped when dropped.
pub struct Server {
    pub base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves `db` on 127.0.0.1 (a free port) from a thread of its own.
pub fn start(db: &Path) -> Server {
    let opts = ServeOptions::new(db.to_path_buf());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx.send(l.local_addr().unwrap()).unwrap();
            serve(opts, l, async {
                let _ = stop_rx.await;
            })
            .await
            .unwrap();
        });
    });
    let addr = addr_rx.recv().unwrap();
    Server {
        base: format!("http://{addr}"),
        stop: Some(stop_tx),
        thread: Some(thread),
    }
}

pub const PASSWORD: &str = "correct horse battery";

/// Adds password accounts.
pub fn users(store: &mut Store, names: &[&str], admin: bool) {
    for n in names {
        store.add_user(n, Some(PASSWORD), admin).unwrap();
    }
}

/// A project of `kind` with `n` items (answers: 2 for pairwise, 4 for rank, 1 for single).
pub fn project(store: &mut Store, name: &str, kind: Kind, n: usize, k: u32) -> Project {
    let p = store.ensure_project(name, kind, Some(k)).unwrap();
    let answers = match kind {
        Kind::Pairwise => 2,
        Kind::Rank => 4,
        Kind::Single => 1,
        Kind::Demo => 0,
    };
    let items: Vec<NewItem> = (0..n)
        .map(|i| NewItem {
            prompt: json!(format!("Question {i}: what is {i} plus {i}?")),
            meta: Map::new(),
            candidates: (0..answers)
                .map(|j| Value::from(format!("answer {j} to question {i}: {}", i + i + j)))
                .collect(),
        })
        .collect();
    store.add_items(&p, &items).unwrap();
    p
}

pub fn db_in(dir: &Path) -> PathBuf {
    dir.join("feedback.sqlite")
}
