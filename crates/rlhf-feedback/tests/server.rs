//! The labelling app over HTTP: labelling through the forms, and one test per security rule
//! of issue #16 (escaping, CSRF, cookies, body limit, login rate limit, who sees what, the
//! bind rule, no outside requests).

mod client;
mod common;

use std::net::SocketAddr;

use client::{csrf_of, Client};
use common::{db_in, project, start, users, PASSWORD};
use rlhf_feedback::label::{Choice, Label, Thumb};
use rlhf_feedback::server::{prepare, ServeOptions};
use rlhf_feedback::store::{NewItem, Store};
use rlhf_feedback::Kind;
use serde_json::{json, Map};

const SCRIPT: &str = "<script>alert('x')</script>";
const ATTR: &str = "\"><img src=x onerror=alert(1) x='";

fn signed_in(base: &str, name: &str) -> Client {
    let mut c = Client::new(base);
    let r = c.login(name, PASSWORD);
    assert_eq!(r.status, 303, "login of {name}: {}", r.body);
    c
}

/// Follows `/p/{pid}` to the item it hands out; returns the item's path.
fn next_item(c: &mut Client, pid: i64) -> String {
    let r = c.get(&format!("/p/{pid}"));
    assert_eq!(r.status, 303, "{}", r.body);
    r.location.unwrap()
}

#[test]
fn labels_of_every_kind_go_through_the_forms() {
    let tmp = tempfile::tempdir().unwrap();
    let db = db_in(tmp.path());
    let mut store = Store::open(&db).unwrap();
    users(&mut store, &["ann"], false);
    let pw = project(&mut store, "pairs", Kind::Pairwise, 2, 1);
    let rk = project(&mut store, "ranks", Kind::Rank, 1, 1);
    let sg = project(&mut store, "single", Kind::Single, 1, 1);
    let dm = project(&mut store, "demos", Kind::Demo, 1, 1);
    let srv = start(&db);
    let mut c = signed_in(&srv.base, "ann");
    let csrf = c.csrf();

    let item = next_item(&mut c, pw.id);
    let page = c.get(&item);
    assert_eq!(page.status, 200);
    assert!(page.body.contains("Question 0"), "{}", page.body);
    let r = c.post(
        &item,
        &[
            ("csrf", &csrf),
            ("choice", "b"),
            ("degree", "slightly_better"),
            ("safety_0", "unsafe"),
            ("safety_1", "safe"),
            ("lead_time_ms", "4321"),
            ("tags", "math, tone"),
        ],
    );
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(r.location.as_deref(), Some(&*format!("/p/{}", pw.id)));
    // Skipping the second item ends the project for ann.
    let item2 = next_item(&mut c, pw.id);
    assert_ne!(item, item2);
    let r = c.post(&format!("{item2}/skip"), &[("csrf", &csrf)]);
    assert_eq!(r.status, 303);
    let done = c.get(&format!("/p/{}", pw.id));
    assert!(done.body.contains("All done"), "{}", done.body);

    let item = next_item(&mut c, rk.id);
    let r = c.post(
        &item,
        &[
            ("csrf", &csrf),
            ("rank_0", "2"),
            ("rank_1", "1"),
            ("rank_2", ""),
            ("rank_3", "2"),
        ],
    );
    assert_eq!(r.status, 303, "{}", r.body);
    let item = next_item(&mut c, sg.id);
    let r = c.post(
        &item,
        &[("csrf", &csrf), ("thumb", "down"), ("rewrite", "It is 0.")],
    );
    assert_eq!(r.status, 303, "{}", r.body);
    let item = next_item(&mut c, dm.id);
    // An empty demonstration is refused with the form shown again, and nothing stored.
    let r = c.post(&item, &[("csrf", &csrf), ("text", "  ")]);
    assert_eq!(r.status, 400);
    assert!(r.body.contains("Write an answer first"), "{}", r.body);
    let r = c.post(&item, &[("csrf", &csrf), ("text", "Zero.")]);
    assert_eq!(r.status, 303, "{}", r.body);

    let store = Store::open(&db).unwrap();
    let l = store.labels(pw.id).unwrap();
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].lead_time_ms, Some(4321));
    match &l[0].label {
        Label::Pairwise {
            choice,
            degree,
            safety,
            notes,
        } => {
            assert_eq!(*choice, Choice::B);
            assert_eq!(*degree, Some(rlhf_data::Degree::SlightlyBetter));
            assert_eq!(
                safety,
                &vec![
                    Some(rlhf_data::Safety::Unsafe),
                    Some(rlhf_data::Safety::Safe)
                ]
            );
            assert_eq!(notes.tags, vec!["math", "tone"]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(store.progress(&pw).unwrap().skips, 1);
    match &store.labels(rk.id).unwrap()[0].label {
        Label::Rank { ranking, .. } => assert_eq!(ranking, &vec![vec![1], vec![0, 3]]),
        other => panic!("{other:?}"),
    }
    match &store.labels(sg.id).unwrap()[0].label {
        Label::Single { thumb, rewrite, .. } => {
            assert_eq!(*thumb, Thumb::Down);
            assert_eq!(rewrite.as_deref(), Some("It is 0."));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(store.labels(dm.id).unwrap().len(), 1);
    // Without the browser's measure, the server's own time on the page is kept.
    assert!(store.labels(sg.id).unwrap()[0].lead_time_ms.is_none());
}

#[test]
fn every_piece_of_text_is_escaped() {
    let tmp = tempfile::tempdir().unwrap();
    let db = db_in(tmp.path());
    let mut store = Store::open(&db).unwrap();
    let evil_name = format!("{SCRIPT}{ATTR}");
    store.add_user(&evil_name, Some(PASSWORD), true).unwrap();
    let p = store
        .ensure_project(&format!("p{SCRIPT}"), Kind::Pairwise, None)
        .unwrap();
    store
        .set_instructions(p.id, &format!("read {ATTR} carefully {SCRIPT}"))
        .unwrap();
    let mut meta = Map::new();
    meta.insert("tags".into(), json!([SCRIPT, ATTR]));
    store
        .add_items(
            &p,
            &[NewItem {
                prompt: json!(format!("prompt {SCRIPT} {ATTR}")),
                meta,
                candidates: vec![json!(format!("A {SCRIPT}")), json!(format!("B {ATTR}"))],
            }],
        )
        .unwrap();
    let srv = start(&db);
    let mut c = signed_in(&srv.base, &evil_name);
    let csrf = c.csrf();
    let item = next_item(&mut c, p.id);
    let r = c.post(
        &item,
        &[
            ("csrf", &csrf),
            ("choice", "a"),
            ("comment", SCRIPT),
            ("tags", ATTR),
        ],
    );
    assert_eq!(r.status, 303, "{}", r.body);
    let lid = Store::open(&db).unwrap().labels(p.id).unwrap()[0].id;
    for path in [
        "/".to_string(),
        item.clone(),
        "/admin".to_string(),
        format!("/p/{}/mine", p.id),
        format!("/labels/{lid}"),
    ] {
        let page = c.get(&path);
        assert_eq!(page.status, 200, "{path}: {}", page.body);
        // Neither payload survives as markup: no script element or event handler attribute
        // of ours, and no quote that closes an attribute early.
        assert!(
            !page.body.contains(SCRIPT),
            "{path}: raw script\n{}",
            page.body
        );
        assert!(
            !page.body.contains(ATTR),
            "{path}: raw attribute breaker\n{}",
            page.body
        );
        assert!(!page.body.contains("<img"), "{path}\n{}", page.body);
        assert!(
            page.body.contains("&lt;script&gt;"),
            "{path}: the text is shown escaped\n{}",
            page.body
        );
    }
    // The label page's prefill (JSON in a single-quoted attribute) stays inside its quotes.
    let page = c.get(&format!("/labels/{lid}"));
    let at = page.body.find("data-editing='").unwrap() + "data-editing='".len();
    let attr = &page.body[at..at + page.body[at..].find('\'').unwrap()];
    assert!(attr.contains("\\u003cscript\\u003e"), "{attr}");
}

#[test]
fn forms_need_the_sessions_csrf_token() {
    let tmp = tempfile::tempdir().unwrap();
    let db = db_in(tmp.path());
    let mut store = Store::open(&db).unwrap();
    users(&mut store, &["ann", "bob"], false);
    let p = project(&mut store, "p", Kind::Pairwise, 1, 2);
    let srv = start(&db);
    let mut ann = signed_in(&srv.base, "ann");
    let mut bob = signed_in(&srv.base, "bob");
    let item = next_item(&mut ann, p.id);
    let bobs = bob.csrf();
    for form in [
        vec![("choice", "a")],
        vec![("csrf", "0000"), ("choice", "a")],
        // Another session's token is as bad as none.
        vec![("csrf", bobs.as_str()), ("choice", "a")],
    ] {
        let r = ann.post(&item, &form);
        assert_eq!(r.status, 403, "{form:?}");
        let r = ann.post(&format!("{item}/skip"), &form);
        assert_eq!(r.status, 403);
    }
    let r = ann.post("/logout", &[]);
    assert_eq!(r.status, 403);
    assert_eq!(Store::open(&db).unwrap().label_count().unwrap(), 0);
    // The login form's token must match the cookie set with the form (double submit).
    let mut stranger = Client::new(&srv.base);
    let page = stranger.get("/login");
    let csrf = csrf_of(&page.body).unwrap();
    stranger.cookies.clear();
    let r = stranger.post(
        "/login",
        &[("csrf", &csrf), ("name", "ann"), ("password", PASSWORD)],
    );
    assert_eq!(r.status, 403);
    assert!(!stranger.cookies.contains_key("rlhf_session"));
}

#[test]
fn session_cookies_are_httponly_and_samesite_and_pages_have_a_strict_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let db = db_in(tmp.path());
    let mut store = Store::open(&db).unwrap();
    users(&mut store, &["ann"], false);
    let srv = start(&db);
    let mut c = Client::new(&srv.base);
    let r = c.login("ann", PASSWORD);
    let session = r
        .set_cookies
        .iter()
        .find(|c| c.starts_with("rlhf_session="))
        .expect("a session cookie");
    assert!(session.contains("HttpOnly"), "{session}");
    assert!(session.contains("SameSite=Strict"), "{session}");
    let home = c.get("/");
    let csp = home.header("content-security-policy").unwrap();
    assert!(
        csp.contains("default-src 'self'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    assert_eq!(home.header("x-frame-options"), Some("DENY"));
    // Every URL a page names is on this server.
    for attr in ["src=\"", "href=\"", "action=\""] {
        for part in home.body.split(attr).skip(1) {
            assert!(
                part.starts_with('/'),
                "{attr}{}",
                &part[..part.len().min(40)]
            );
        }
    }
    // Signed out: pages send you to the login, forms do nothing.
    let mut anon = Client::new(&srv.base);
    let r = anon.get("/");
    assert_eq!((r.status, r.location.as_deref()), (303, Some("/login")));
    let r = anon.post("/p/1/i/1", &[("choice", "a")]);
    assert_eq!(r.status, 303);
    assert_eq!(Store::open(&db).unwrap().label_count().unwrap(), 0);
}

#[test]
fn request_bodies_over_the_limit_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let db = db_in(tmp.path());
    let mut store = Store::open(&db).unwrap();
    users(&mut store, &["ann"], false);
    let p = project(&mut store, "d", Kind::Demo, 1, 1);
    let srv = start(&db);
    let mut c = signed_in(&srv.base, "ann");
    let csrf = c.csrf();
    let item = next_item(&mut c, p.id);
    let mut body = format!("csrf={csrf}&text=").into_bytes();
    body.extend(std::iter::repeat_n(
        b'a',
        rlhf_feedback::server::MAX_BODY + 1,
    ));
    let r = c.post_raw(&item, body);
    assert_eq!(r.status, 413);
    assert_eq!(Store::open(&db).unwrap().label_count().unwrap(), 0);
}

#[test]
fn failed_logins_are_rate_limited() {
    let tmp = tempfile::tempdir().unwrap();
    let db = db_in(tmp.path());
    let mut store = Store::open(&db).unwrap();
    users(&mut store, &["ann"], false);
    let srv = start(&db);
    let mut c = Client::new(&srv.base);
    for _ in 0..10 {
        let r = c.login("ann", "not the password");
        assert_eq!(r.status, 401);
    }
    // Now even the right password waits.
    let r = c.login("ann", PASSWORD);
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(r.body.contains("Too many failed sign-ins"));
    let r = c.login_token("0123456789abcdef");
    assert_eq!(r.status, 429);
}

#[test]
fn annotators_reach_only_their_own_labels_and_no_admin_page() {
    let tmp = tempfile::tempdir().unwrap();
    let db = db_in(tmp.path());
    let mut store = Store::open(&db).unwrap();
    users(&mut store, &["ann", "bob"], false);
    users(&mut store, &["root"], true);
    let p = project(&mut store, "p", Kind::Pairwise, 1, 2);
    let srv = start(&db);
    let mut ann = signed_in(&srv.base, "ann");
    let mut bob = signed_in(&srv.base, "bob");
    let mut root = signed_in(&srv.base, "root");
    let ann_csrf = ann.csrf();
    let item = next_item(&mut ann, p.id);
    assert_eq!(
        ann.post(
            &item,
            &[
                ("csrf", &ann_csrf),
                ("choice", "a"),
                ("comment", "ann's secret")
            ]
        )
        .status,
        303
    );
    let lid = Store::open(&db).unwrap().labels(p.id).unwrap()[0].id;
    // bob cannot read ann's label, nor change it, nor learn that it exists.
    let r = bob.get(&format!("/labels/{lid}"));
    assert_eq!(r.status, 404);
    assert!(!r.body.contains("ann's secret"));
    assert_eq!(bob.get(&format!("/labels/{}", lid + 100)).status, 404);
    let bob_csrf = bob.csrf();
    let r = bob.post(
        &format!("/labels/{lid}"),
        &[("csrf", &bob_csrf), ("choice", "b")],
    );
    assert_eq!(r.status, 404);
    // bob's own pages show nothing of ann's before or after he labels.
    let page = bob.get(&item);
    assert!(!page.body.contains("ann's secret"));
    let mine = bob.get(&format!("/p/{}/mine", p.id));
    assert!(!mine.body.contains("ann's secret"));
    // Neither annotator reaches the admin page; the admin does.
    assert_eq!(bob.get("/admin").status, 404);
    assert_eq!(ann.get("/admin").status, 404);
    let admin = root.get("/admin");
    assert_eq!(admin.status, 200);
    assert!(admin.body.contains("Observed agreement") || admin.body.contains("Labels"));
    // ann edits her own label.
    let r = ann.post(
        &format!("/labels/{lid}"),
        &[("csrf", &ann_csrf), ("choice", "tie")],
    );
    assert_eq!(r.status, 303, "{}", r.body);
    let store = Store::open(&db).unwrap();
    let l = &store.labels(p.id).unwrap()[0];
    assert!(matches!(
        l.label,
        Label::Pairwise {
            choice: Choice::Tie,
            ..
        }
    ));
    assert_eq!(l.user, "ann");
}

#[test]
fn the_admin_page_shows_progress_and_agreement() {
    let tmp = tempfile::tempdir().unwrap();
    let db = db_in(tmp.path());
    let mut store = Store::open(&db).unwrap();
    users(&mut store, &["root"], true);
    let p = project(&mut store, "agree", Kind::Pairwise, 4, 2);
    let (a, _) = store.add_user("a", None, false).unwrap();
    let (b, _) = store.add_user("b", None, false).unwrap();
    let ids = store.item_ids(p.id).unwrap();
    let pick = |c: Choice| Label::Pairwise {
        choice: c,
        degree: None,
        safety: vec![],
        notes: Default::default(),
    };
    // a: A A B B; b: A A B A → 3 of 4 agree; Cohen's kappa = (0.75 - 0.5) / 0.5 = 0.5.
    for (i, (x, y)) in [
        (Choice::A, Choice::A),
        (Choice::A, Choice::A),
        (Choice::B, Choice::B),
        (Choice::B, Choice::A),
    ]
    .into_iter()
    .enumerate()
    {
        store.submit(ids[i], a.id, &pick(x), Some(1000)).unwrap();
        store.submit(ids[i], b.id, &pick(y), Some(3000)).unwrap();
    }
    let srv = start(&db);
    let mut root = signed_in(&srv.base, "root");
    let page = root.get("/admin").body;
    assert!(page.contains("<td class=\"complete\">4</td>"), "{page}");
    assert!(page.contains("<td class=\"observed\">0.750</td>"), "{page}");
    assert!(page.contains("<td class=\"cohen\">0.500</td>"), "{page}");
    assert!(page.contains("2.0 s"), "median lead time\n{page}");
}

#[test]
fn only_loopback_is_served_without_accounts() {
    let tmp = tempfile::tempdir().unwrap();
    let db = db_in(tmp.path());
    let mut opts = ServeOptions::new(db.clone());
    opts.bind = "0.0.0.0:8080".parse::<SocketAddr>().unwrap();
    let e = prepare(&opts).unwrap_err().to_string();
    assert!(e.contains("without accounts"), "{e}");
    // Loopback without accounts: a `local` admin whose login link is printed.
    opts.bind = "127.0.0.1:8080".parse().unwrap();
    let line = prepare(&opts).unwrap();
    let token = line.split("token=").nth(1).unwrap().trim();
    let srv = start(&db);
    let mut c = Client::new(&srv.base);
    assert_eq!(c.login_token(token).status, 303);
    assert_eq!(c.get("/admin").status, 200);
    // The `local` account does not count as an account for other addresses...
    opts.bind = "0.0.0.0:8080".parse().unwrap();
    assert!(prepare(&opts).is_err());
    // ...a real one does.
    Store::open(&db)
        .unwrap()
        .add_user("ann", Some(PASSWORD), false)
        .unwrap();
    prepare(&opts).unwrap();
}
