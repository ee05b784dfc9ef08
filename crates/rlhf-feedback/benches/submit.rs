//! Label submission latency with 20 annotators at once (issue #16's goal: p99 under 20 ms).
//!
//! `cargo bench -p rlhf-feedback --bench submit [-- ANNOTATORS LABELS_EACH]`: the app serves a
//! fresh database in-process on loopback (two tokio workers), each annotator thread signs in,
//! then asks for its next item and submits a pairwise label, LABELS_EACH times; the latency of
//! each submission (POST to its 303, which comes after the commit: SQLite WAL,
//! synchronous=FULL) is recorded. Prints one JSON line. Client and server share the machine.

#[path = "../tests/client/mod.rs"]
mod client;
#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::{Arc, Barrier};
use std::time::Instant;

use client::Client;
use common::{db_in, project, start, users, PASSWORD};
use rlhf_feedback::store::Store;
use rlhf_feedback::Kind;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let annotators = args.first().copied().unwrap_or(20);
    let each = args.get(1).copied().unwrap_or(50);
    let tmp = tempfile::tempdir().unwrap();
    let db = db_in(tmp.path());
    let mut store = Store::open(&db).unwrap();
    let names: Vec<String> = (0..annotators).map(|i| format!("a{i}")).collect();
    users(
        &mut store,
        &names.iter().map(String::as_str).collect::<Vec<_>>(),
        false,
    );
    let items = annotators * each;
    let p = project(&mut store, "bench", Kind::Pairwise, items, 1);
    drop(store);
    let srv = start(&db);
    let barrier = Arc::new(Barrier::new(annotators + 1));
    let workers: Vec<_> = names
        .into_iter()
        .map(|name| {
            let (base, barrier, pid) = (srv.base.clone(), barrier.clone(), p.id);
            std::thread::spawn(move || {
                let mut c = Client::new(&base);
                assert_eq!(c.login(&name, PASSWORD).status, 303);
                let csrf = c.csrf();
                barrier.wait();
                let mut lat = Vec::with_capacity(each);
                for _ in 0..each {
                    let item = c.get(&format!("/p/{pid}")).location.expect("an item");
                    let t = Instant::now();
                    let r = c.post(
                        &item,
                        &[("csrf", &csrf), ("choice", "a"), ("degree", "better")],
                    );
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                    assert_eq!(r.status, 303, "{}", r.body);
                }
                lat
            })
        })
        .collect();
    barrier.wait();
    let t0 = Instant::now();
    let mut lat: Vec<f64> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    let wall = t0.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    let q = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
    let stored = Store::open(&db).unwrap().label_count().unwrap();
    assert_eq!(stored, lat.len());
    println!(
        "{}",
        serde_json::json!({
            "bench": "feedback_submit", "annotators": annotators, "submissions": lat.len(),
            "p50_ms": q(0.5), "p90_ms": q(0.9), "p99_ms": q(0.99), "max_ms": q(1.0),
            "submissions_per_s": lat.len() as f64 / wall,
            "note": "submissions/s counts only the POSTs; each annotator also fetches its next item in between"
        })
    );
}
