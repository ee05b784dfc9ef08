//! Nothing lost under load: 20 annotators submit at once over loopback (bounded: 15 labels
//! each), while exports run beside them; then every acknowledged label is in the database
//! exactly once, and every export was one consistent snapshot.

mod client;
mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};

use client::Client;
use common::{db_in, project, start, users, PASSWORD};
use rlhf_feedback::export::{export, Aggregate, ExportOptions, Format};
use rlhf_feedback::store::Store;
use rlhf_feedback::Kind;

const ANNOTATORS: usize = 20;
const EACH: usize = 15;

#[test]
fn twenty_annotators_at_once_lose_and_double_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let db = db_in(tmp.path());
    let mut store = Store::open(&db).unwrap();
    let names: Vec<String> = (0..ANNOTATORS).map(|i| format!("annotator{i}")).collect();
    users(
        &mut store,
        &names.iter().map(String::as_str).collect::<Vec<_>>(),
        false,
    );
    // 200 items x 2 people = 400 places for 300 labels.
    let p = project(&mut store, "load", Kind::Pairwise, 200, 2);
    drop(store);
    let srv = start(&db);

    let stop = Arc::new(AtomicBool::new(false));
    let exporter = {
        let (db, stop) = (db.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut store = Store::open(&db).unwrap();
            let mut snapshots = 0;
            while !stop.load(Ordering::Relaxed) {
                let opts = ExportOptions {
                    format: Format::Labels,
                    aggregate: Aggregate::None,
                    project: Some("load".into()),
                };
                let (rows, _) = export(&mut store, &opts).unwrap();
                // Labels get ids in commit order and are never deleted, so a consistent
                // snapshot holds exactly the labels 1..=m for some m: no gap, no later one.
                let mut ids: Vec<i64> = rows
                    .iter()
                    .map(|r| r["label_id"].as_i64().expect("label rows carry label_id"))
                    .collect();
                ids.sort_unstable();
                let expect: Vec<i64> = (1..=ids.len() as i64).collect();
                assert_eq!(ids, expect, "an export mixed two moments");
                snapshots += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            snapshots
        })
    };

    let barrier = Arc::new(Barrier::new(ANNOTATORS));
    let workers: Vec<_> = names
        .iter()
        .map(|name| {
            let (base, name, barrier) = (srv.base.clone(), name.clone(), barrier.clone());
            let pid = p.id;
            std::thread::spawn(move || {
                let mut c = Client::new(&base);
                assert_eq!(c.login(&name, PASSWORD).status, 303);
                let csrf = c.csrf();
                barrier.wait();
                let mut acked = Vec::new();
                for _ in 0..EACH {
                    let r = c.get(&format!("/p/{pid}"));
                    assert_eq!(r.status, 303, "{}", r.body);
                    let item = r.location.unwrap();
                    let r = c.post(&item, &[("csrf", &csrf), ("choice", "a")]);
                    assert_eq!(r.status, 303, "{}", r.body);
                    let id: i64 = item.rsplit('/').next().unwrap().parse().unwrap();
                    acked.push((name.clone(), id));
                }
                acked
            })
        })
        .collect();
    let acked: Vec<(String, i64)> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    stop.store(true, Ordering::Relaxed);
    let snapshots = exporter.join().unwrap();
    assert!(snapshots > 0);

    let store = Store::open(&db).unwrap();
    let labels = store.labels(p.id).unwrap();
    let stored: BTreeSet<(String, i64)> =
        labels.iter().map(|l| (l.user.clone(), l.item_id)).collect();
    assert_eq!(acked.len(), ANNOTATORS * EACH);
    assert_eq!(labels.len(), acked.len(), "a label was lost or doubled");
    assert_eq!(stored, acked.into_iter().collect::<BTreeSet<_>>());
    // Nobody got an item twice, and no item went to more than its two people.
    let mut per_item = std::collections::BTreeMap::new();
    for l in &labels {
        *per_item.entry(l.item_id).or_insert(0) += 1;
    }
    assert!(per_item.values().all(|&n| n <= 2), "{per_item:?}");
}
