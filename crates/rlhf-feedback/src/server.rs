//! `rlhf feedback serve`: the labelling web app.
//!
//! Server-rendered pages (minijinja templates with HTML auto-escaping, compiled into the
//! binary with their one script and stylesheet; no request leaves the server: the
//! Content-Security-Policy says `'self'` only), on the [`Store`] through a small pool of
//! SQLite connections used from tokio's blocking threads.
//!
//! Security: 127.0.0.1 unless told otherwise, and no other address without accounts; sessions
//! are random 256-bit ids in `HttpOnly; SameSite=Strict` cookies, stored hashed; every form
//! carries the session's CSRF token (the login form a double-submit one) and every POST checks
//! it; request bodies are capped; failed logins are limited per address and per name; an
//! annotator reaches only their own labels, and only admins the admin page.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, DefaultBodyLimit, Form, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use minijinja::{context, Environment};
use serde::Deserialize;
use serde_json::Value;

use crate::export::project_agreement;
use crate::label::{Choice, Kind, Label, Notes, Thumb};
use crate::store::{random_token, Project, Store, StoredLabel, User};
use crate::time::now_ms;
use crate::{Error, Result};

/// The session cookie.
const SESSION_COOKIE: &str = "rlhf_session";
/// The login form's double-submit CSRF cookie.
const LOGIN_COOKIE: &str = "rlhf_login";
/// The largest request body accepted (a long demonstration fits; a flood does not).
pub const MAX_BODY: usize = 256 * 1024;
/// Failed logins allowed per address or name in [`LOGIN_WINDOW`].
const LOGIN_FAILURES: u32 = 10;
const LOGIN_WINDOW: Duration = Duration::from_secs(300);

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The database.
    pub db: PathBuf,
    /// Where to listen.
    pub bind: SocketAddr,
    /// How long a login lasts.
    pub session_ttl: Duration,
}

impl ServeOptions {
    /// Serving `db` on 127.0.0.1:8080 with 12-hour sessions.
    pub fn new(db: PathBuf) -> Self {
        ServeOptions {
            db,
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            session_ttl: Duration::from_secs(12 * 3600),
        }
    }
}

/// What the writer thread runs: a write, returning what to do once its batch is committed.
type Job = Box<dyn FnOnce(&mut Store) -> Finish + Send>;
/// Sends a write's outcome: its own result, unless the batch's commit failed.
type Finish = Box<dyn FnOnce(Option<&Error>) + Send>;

/// Connections to the database: one writer thread that commits whatever writes are waiting
/// as one transaction (group commit: one fsync for many labels, each write in a savepoint of
/// its own, each answered only after the commit), and reusable readers beside it (WAL lets
/// them read while the writer writes).
struct Pool {
    path: PathBuf,
    jobs: Mutex<std::sync::mpsc::Sender<Job>>,
    idle: Mutex<Vec<Store>>,
}

/// Writes at most this many in one transaction.
const MAX_BATCH: usize = 64;

impl Pool {
    fn new(path: PathBuf) -> Result<Pool> {
        let mut store = Store::open(&path)?;
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("feedback-writer".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(j) => batch.push(j),
                            Err(_) => break,
                        }
                    }
                    match store.begin_batch() {
                        Ok(()) => {
                            let finish: Vec<Finish> =
                                batch.into_iter().map(|j| j(&mut store)).collect();
                            let err = store.commit_batch().err();
                            if let Some(e) = &err {
                                tracing::error!(
                                    "a batch of {} writes failed to commit: {e}",
                                    finish.len()
                                );
                            }
                            for f in finish {
                                f(err.as_ref());
                            }
                        }
                        Err(e) => {
                            // No batch: each write commits on its own.
                            tracing::warn!("group commit unavailable ({e}); writing one by one");
                            for j in batch {
                                j(&mut store)(None);
                            }
                        }
                    }
                }
            })
            .map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
        Ok(Pool {
            path,
            jobs: Mutex::new(tx),
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Runs `f`, which only reads, with a reader connection on a blocking thread.
    async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Store) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let pool = self.clone();
        tokio::task::spawn_blocking(move || {
            let store = pool.idle.lock().map(|mut v| v.pop()).unwrap_or(None);
            let mut store = match store {
                Some(s) => s,
                None => Store::open(&pool.path)?,
            };
            let out = f(&mut store);
            if let Ok(mut v) = pool.idle.lock() {
                if v.len() < 32 {
                    v.push(store);
                }
            }
            out
        })
        .await
        .map_err(|e| Error::Invalid(format!("a database task failed: {e}")))?
    }

    /// Runs `f`, which writes, on the writer thread; answers after its batch is committed.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel::<Result<T>>();
        let job: Job = Box::new(move |store: &mut Store| {
            let out = f(store);
            Box::new(move |commit: Option<&Error>| {
                let out = match (out, commit) {
                    (Ok(_), Some(e)) => {
                        Err(Error::Invalid(format!("the write was rolled back: {e}")))
                    }
                    (out, _) => out,
                };
                let _ = tx.send(out);
            }) as Finish
        });
        let sent = self
            .jobs
            .lock()
            .map_err(|_| Error::Invalid("the database writer stopped".into()))?
            .send(job);
        sent.map_err(|_| Error::Invalid("the database writer stopped".into()))?;
        rx.await
            .map_err(|_| Error::Invalid("the database writer stopped".into()))?
    }
}

/// Counts failed logins per key (address or name) in a sliding window.
#[derive(Default)]
struct Limiter {
    failures: Mutex<HashMap<String, (u32, Instant)>>,
}

impl Limiter {
    fn blocked(&self, key: &str) -> bool {
        let map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        map.get(key)
            .is_some_and(|(n, t)| *n >= LOGIN_FAILURES && t.elapsed() < LOGIN_WINDOW)
    }

    fn fail(&self, key: &str) {
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let e = map.entry(key.to_string()).or_insert((0, Instant::now()));
        if e.1.elapsed() >= LOGIN_WINDOW {
            *e = (0, Instant::now());
        }
        e.0 += 1;
    }
}

struct App {
    pool: Arc<Pool>,
    env: Environment<'static>,
    limiter: Limiter,
    ttl: Duration,
}

type Shared = Arc<App>;

/// The signed-in annotator of a request.
struct Auth {
    user: User,
    csrf: String,
}

/// Checks the options, prepares the database and serves until `shutdown` completes.
///
/// On a loopback address with no accounts, a `local` admin account gets a fresh login token,
/// and the login link is printed (as Jupyter does); any other address needs accounts.
pub async fn serve(
    opts: ServeOptions,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let app = Arc::new(App {
        pool: Arc::new(Pool::new(opts.db.clone())?),
        env: templates(),
        limiter: Limiter::default(),
        ttl: opts.session_ttl,
    });
    let router = router(app);
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
    .map_err(|source| Error::Io {
        path: opts.db.clone(),
        source,
    })
}

/// Opens the database, applies the bind rule, and returns the login line to print.
pub fn prepare(opts: &ServeOptions) -> Result<String> {
    let mut store = Store::open(&opts.db)?;
    let accounts = store
        .users()?
        .into_iter()
        .filter(|u| u.name != "local")
        .count();
    let loopback = opts.bind.ip().is_loopback();
    if !loopback && accounts == 0 {
        return Err(Error::Invalid(format!(
            "refusing to serve {} on {} without accounts: anyone who can reach it could label. \
             Create them first (`rlhf feedback user add NAME --db {}`), or bind 127.0.0.1",
            opts.db.display(),
            opts.bind,
            opts.db.display()
        )));
    }
    if accounts == 0 {
        let token = match store.users()?.iter().any(|u| u.name == "local") {
            true => store.reset_token("local")?,
            false => store.add_user("local", None, true)?.1,
        };
        return Ok(format!(
            "no accounts yet: signed-in link for this machine's `local` admin (new each start):\n  \
             http://{}/login?token={token}",
            opts.bind
        ));
    }
    Ok(format!(
        "{accounts} account(s); sign in at http://{}/login",
        opts.bind
    ))
}

/// Serves with a tokio runtime of its own until Ctrl-C.
pub fn run(opts: ServeOptions) -> Result<()> {
    let line = prepare(&opts)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| Error::Io {
            path: opts.db.clone(),
            source,
        })?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(opts.bind)
            .await
            .map_err(|source| Error::Io {
                path: PathBuf::from(opts.bind.to_string()),
                source,
            })?;
        eprintln!(
            "rlhf feedback: serving {} on http://{}",
            opts.db.display(),
            listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default()
        );
        eprintln!("{line}");
        serve(opts, listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
    })
}

fn router(app: Shared) -> Router {
    Router::new()
        .route("/", get(home))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/p/{pid}", get(next_item))
        .route("/p/{pid}/i/{iid}", get(item_page).post(submit))
        .route("/p/{pid}/i/{iid}/skip", post(skip))
        .route("/p/{pid}/mine", get(my_labels))
        .route("/labels/{lid}", get(label_page).post(update_label))
        .route("/admin", get(admin))
        .route("/assets/app.js", get(script))
        .route("/assets/app.css", get(style))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(app)
}

async fn security_headers(mut res: Response) -> Response {
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    res
}

// ---- templates and responses ----------------------------------------------------------

fn templates() -> Environment<'static> {
    let mut env = Environment::new();
    // `.html` names turn on HTML auto-escaping of every `{{ }}`.
    for (name, src) in [
        ("base.html", include_str!("../templates/base.html")),
        ("login.html", include_str!("../templates/login.html")),
        ("home.html", include_str!("../templates/home.html")),
        ("item.html", include_str!("../templates/item.html")),
        ("mine.html", include_str!("../templates/mine.html")),
        ("admin.html", include_str!("../templates/admin.html")),
        ("message.html", include_str!("../templates/message.html")),
    ] {
        env.add_template(name, src).expect("templates parse");
    }
    env
}

fn render(app: &App, name: &str, ctx: minijinja::Value) -> Response {
    match app.env.get_template(name).and_then(|t| t.render(ctx)) {
        Ok(html) => ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response(),
        Err(e) => {
            tracing::error!("template {name}: {e:#}");
            (StatusCode::INTERNAL_SERVER_ERROR, "template error").into_response()
        }
    }
}

fn message(
    app: &App,
    status: StatusCode,
    title: &str,
    text: &str,
    user: Option<&Auth>,
) -> Response {
    let mut r = render(
        app,
        "message.html",
        context! { title, text, user => user.map(|a| &a.user), csrf => user.map(|a| &a.csrf) },
    );
    *r.status_mut() = status;
    r
}

fn internal(app: &App, e: Error) -> Response {
    tracing::error!("{e}");
    message(
        app,
        StatusCode::INTERNAL_SERVER_ERROR,
        "Something went wrong",
        "The server could not complete this request; what you submitted was not saved. Try again.",
        None,
    )
}

async fn not_found(State(app): State<Shared>) -> Response {
    message(
        &app,
        StatusCode::NOT_FOUND,
        "Not found",
        "There is nothing here.",
        None,
    )
}

async fn script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        include_str!("../assets/app.js"),
    )
        .into_response()
}

async fn style() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        include_str!("../assets/app.css"),
    )
        .into_response()
}

// ---- cookies, sessions, CSRF ----------------------------------------------------------

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn set_cookie(name: &str, value: &str, max_age: Duration) -> (header::HeaderName, String) {
    (
        header::SET_COOKIE,
        format!(
            "{name}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
            max_age.as_secs()
        ),
    )
}

/// Compares secrets in time independent of where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

async fn auth(app: &Shared, headers: &HeaderMap) -> Result<Option<Auth>> {
    let Some(sid) = cookie(headers, SESSION_COOKIE).map(str::to_string) else {
        return Ok(None);
    };
    let found = app.pool.run(move |s| s.session(&sid)).await?;
    Ok(found.map(|(user, csrf)| Auth { user, csrf }))
}

/// A handler's `Auth` argument: the signed-in user, or the response sent instead (a redirect
/// to the login page).
impl axum::extract::FromRequestParts<Shared> for Auth {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        app: &Shared,
    ) -> Result<Self, Self::Rejection> {
        match auth(app, &parts.headers).await {
            Ok(Some(a)) => Ok(a),
            Ok(None) => Err(Redirect::to("/login").into_response()),
            Err(e) => Err(internal(app, e)),
        }
    }
}

/// A POST's CSRF token must be the session's.
fn check_csrf(app: &App, auth: &Auth, form: &FormData) -> Result<(), Response> {
    match form.get("csrf") {
        Some(t) if same(t, &auth.csrf) => Ok(()),
        _ => Err(message(
            app,
            StatusCode::FORBIDDEN,
            "Form expired",
            "This form's security token does not match your session (it may be from an older \
             sign-in). Reload the page and submit again.",
            Some(auth),
        )),
    }
}

/// A form's fields, in order (a field may repeat).
#[derive(Debug, Default, Deserialize)]
#[serde(transparent)]
struct FormData(Vec<(String, String)>);

impl FormData {
    fn get(&self, k: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }

    fn nonempty(&self, k: &str) -> Option<&str> {
        self.get(k).map(str::trim).filter(|v| !v.is_empty())
    }
}

// ---- login ------------------------------------------------------------------------------

#[derive(Deserialize)]
struct LoginQuery {
    token: Option<String>,
}

async fn login_page(
    State(app): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(q): Query<LoginQuery>,
) -> Response {
    if let Some(token) = q.token {
        return token_login(&app, peer.ip(), token).await;
    }
    login_form(&app, StatusCode::OK, None)
}

fn login_form(app: &App, status: StatusCode, error: Option<&str>) -> Response {
    let csrf = random_token();
    let mut r = render(app, "login.html", context! { csrf, error });
    *r.status_mut() = status;
    let (k, v) = set_cookie(LOGIN_COOKIE, &csrf, Duration::from_secs(3600));
    if let Ok(v) = HeaderValue::from_str(&v) {
        r.headers_mut().append(k, v);
    }
    r
}

async fn token_login(app: &Shared, ip: IpAddr, token: String) -> Response {
    let key = format!("ip:{ip}");
    if app.limiter.blocked(&key) {
        return too_many(app);
    }
    let ttl = app.ttl;
    let r = match app.pool.run(move |s| s.login_token(&token)).await {
        Ok(Some(u)) => app
            .pool
            .write(move |s| s.create_session(u.id, ttl))
            .await
            .map(Some),
        Ok(None) => Ok(None),
        Err(e) => Err(e),
    };
    match r {
        Ok(Some((sid, _))) => start_session(app, &sid),
        Ok(None) => {
            app.limiter.fail(&key);
            login_form(
                app,
                StatusCode::UNAUTHORIZED,
                Some("That login link is not valid."),
            )
        }
        Err(e) => internal(app, e),
    }
}

fn too_many(app: &App) -> Response {
    login_form(
        app,
        StatusCode::TOO_MANY_REQUESTS,
        Some("Too many failed sign-ins; wait five minutes and try again."),
    )
}

fn start_session(app: &App, sid: &str) -> Response {
    let mut r = Redirect::to("/").into_response();
    let (k, v) = set_cookie(SESSION_COOKIE, sid, app.ttl);
    if let Ok(v) = HeaderValue::from_str(&v) {
        r.headers_mut().append(k.clone(), v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("{LOGIN_COOKIE}=; Path=/; Max-Age=0")) {
        r.headers_mut().append(k, v);
    }
    r
}

async fn login(
    State(app): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<FormData>,
) -> Response {
    // Double submit: the form's token must equal the cookie this server set with the form.
    let ok = matches!((cookie(&headers, LOGIN_COOKIE), form.get("csrf")), (Some(c), Some(f)) if same(c, f));
    if !ok {
        return login_form(
            &app,
            StatusCode::FORBIDDEN,
            Some("The sign-in form expired; try again."),
        );
    }
    if let Some(token) = form.nonempty("token") {
        return token_login(&app, peer.ip(), token.to_string()).await;
    }
    let name = form.get("name").unwrap_or("").trim().to_string();
    let password = form.get("password").unwrap_or("").to_string();
    let (ip_key, name_key) = (format!("ip:{}", peer.ip()), format!("name:{name}"));
    if app.limiter.blocked(&ip_key) || app.limiter.blocked(&name_key) {
        return too_many(&app);
    }
    let ttl = app.ttl;
    // The password check (argon2, deliberately slow) runs on a reader, outside the writer.
    let r = match app
        .pool
        .run(move |s| s.login_password(&name, &password))
        .await
    {
        Ok(Some(u)) => app
            .pool
            .write(move |s| s.create_session(u.id, ttl))
            .await
            .map(Some),
        Ok(None) => Ok(None),
        Err(e) => Err(e),
    };
    match r {
        Ok(Some((sid, _))) => start_session(&app, &sid),
        Ok(None) => {
            app.limiter.fail(&ip_key);
            app.limiter.fail(&name_key);
            login_form(
                &app,
                StatusCode::UNAUTHORIZED,
                Some("Wrong name or password."),
            )
        }
        Err(e) => internal(&app, e),
    }
}

async fn logout(
    State(app): State<Shared>,
    a: Auth,
    headers: HeaderMap,
    Form(form): Form<FormData>,
) -> Response {
    if let Err(r) = check_csrf(&app, &a, &form) {
        return r;
    }
    if let Some(sid) = cookie(&headers, SESSION_COOKIE).map(str::to_string) {
        if let Err(e) = app.pool.write(move |s| s.delete_session(&sid)).await {
            return internal(&app, e);
        }
    }
    let mut r = Redirect::to("/login").into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("{SESSION_COOKIE}=; Path=/; Max-Age=0")) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

// ---- pages ------------------------------------------------------------------------------

/// Text of a prompt or answer for the page: a string as it is, a message list as turns.
fn shown(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(msgs) => msgs
            .iter()
            .map(|m| {
                let role = m.get("role").and_then(Value::as_str).unwrap_or("?");
                let content = match m.get("content") {
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => other.to_string(),
                    None => String::new(),
                };
                format!("{role}: {content}")
            })
            .collect::<Vec<_>>()
            .join("\n\n"),
        other => other.to_string(),
    }
}

async fn home(State(app): State<Shared>, a: Auth) -> Response {
    let uid = a.user.id;
    let r = app
        .pool
        .run(move |s| {
            let mut rows = Vec::new();
            for p in s.projects()? {
                let (total, mine) = s.counts(p.id, uid)?;
                rows.push(
                    context! { id => p.id, name => p.name, kind => p.kind.as_str(), total, mine },
                );
            }
            Ok(rows)
        })
        .await;
    match r {
        Ok(projects) => render(
            &app,
            "home.html",
            context! { user => &a.user, csrf => &a.csrf, projects },
        ),
        Err(e) => internal(&app, e),
    }
}

async fn load_project(app: &Shared, pid: i64) -> Result<Option<Project>> {
    app.pool.run(move |s| s.project_by_id(pid)).await
}

async fn next_item(State(app): State<Shared>, a: Auth, Path(pid): Path<i64>) -> Response {
    let project = match load_project(&app, pid).await {
        Ok(Some(p)) => p,
        Ok(None) => return not_found(State(app)).await,
        Err(e) => return internal(&app, e),
    };
    let uid = a.user.id;
    match app.pool.write(move |s| s.next_item(&project, uid)).await {
        Ok(Some(iid)) => Redirect::to(&format!("/p/{pid}/i/{iid}")).into_response(),
        Ok(None) => message(
            &app,
            StatusCode::OK,
            "All done",
            "There is nothing left for you to label in this project. Thank you!",
            Some(&a),
        ),
        Err(e) => internal(&app, e),
    }
}

async fn item_page(
    State(app): State<Shared>,
    a: Auth,
    Path((pid, iid)): Path<(i64, i64)>,
) -> Response {
    show_item(&app, &a, pid, iid, None, None, StatusCode::OK).await
}

/// Renders the labelling page of item `iid` (optionally editing `label`, or with `error`).
async fn show_item(
    app: &Shared,
    a: &Auth,
    pid: i64,
    iid: i64,
    editing: Option<StoredLabel>,
    error: Option<String>,
    status: StatusCode,
) -> Response {
    let uid = a.user.id;
    let r = app
        .pool
        .run(move |s| {
            let Some(project) = s.project_by_id(pid)? else {
                return Ok(None);
            };
            let Some(item) = s.item(iid)?.filter(|i| i.project_id == pid) else {
                return Ok(None);
            };
            let (total, done) = s.counts(pid, uid)?;
            Ok(Some((project, item, done, total)))
        })
        .await;
    let (project, item, done, total) = match r {
        Ok(Some(x)) => x,
        Ok(None) => return not_found(State(app.clone())).await,
        Err(e) => return internal(app, e),
    };
    let answers: Vec<String> = item.candidates.iter().map(|c| shown(&c.text)).collect();
    let letters: Vec<String> = (0..answers.len())
        .map(|i| match project.kind {
            Kind::Rank => (i + 1).to_string(),
            _ => ((b'A' + i as u8) as char).to_string(),
        })
        .collect();
    let action = match &editing {
        Some(l) => format!("/labels/{}", l.id),
        None => format!("/p/{pid}/i/{iid}"),
    };
    let mut r = render(
        app,
        "item.html",
        context! {
            user => &a.user, csrf => &a.csrf, project => &project, kind => project.kind.as_str(),
            item_id => item.id, prompt => shown(&item.prompt), answers, letters,
            tags => item.meta.get("tags"), shown_at => now_ms(), done, total, action,
            editing => editing.as_ref().map(|l| serde_json::to_value(&l.label).unwrap_or(Value::Null)),
            error,
        },
    );
    *r.status_mut() = status;
    r
}

/// A label from the item form's fields.
fn label_from_form(kind: Kind, n: usize, f: &FormData) -> Result<Label, String> {
    let notes = Notes {
        comment: f.nonempty("comment").map(str::to_string),
        tags: f
            .get("tags")
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .collect(),
    };
    let label = match kind {
        Kind::Pairwise => {
            let choice = match f.get("choice") {
                Some("a") => Choice::A,
                Some("b") => Choice::B,
                Some("tie") => Choice::Tie,
                Some("both_bad") => Choice::BothBad,
                _ => return Err("Choose A, B, tie or both bad.".into()),
            };
            let degree = match f.nonempty("degree") {
                Some(d) if matches!(choice, Choice::A | Choice::B) => Some(
                    rlhf_data::Degree::parse(d).ok_or_else(|| format!("Unknown degree {d:?}."))?,
                ),
                _ => None,
            };
            let safety: Vec<Option<rlhf_data::Safety>> = (0..n)
                .map(|i| match f.get(&format!("safety_{i}")) {
                    Some("safe") => Some(rlhf_data::Safety::Safe),
                    Some("unsafe") => Some(rlhf_data::Safety::Unsafe),
                    _ => None,
                })
                .collect();
            let safety = if safety.iter().all(Option::is_none) {
                vec![]
            } else {
                safety
            };
            Label::Pairwise {
                choice,
                degree,
                safety,
                notes,
            }
        }
        Kind::Rank => {
            let mut ranks: Vec<(u32, usize)> = Vec::new();
            for i in 0..n {
                if let Some(v) = f.nonempty(&format!("rank_{i}")) {
                    let r: u32 = v
                        .parse()
                        .map_err(|_| format!("The rank of answer {} must be a number.", i + 1))?;
                    ranks.push((r, i));
                }
            }
            ranks.sort();
            let mut ranking: Vec<Vec<usize>> = Vec::new();
            let mut last = None;
            for (r, i) in ranks {
                if last == Some(r) {
                    if let Some(g) = ranking.last_mut() {
                        g.push(i);
                    }
                } else {
                    ranking.push(vec![i]);
                    last = Some(r);
                }
            }
            Label::Rank { ranking, notes }
        }
        Kind::Single => Label::Single {
            thumb: match f.get("thumb") {
                Some("up") => Thumb::Up,
                Some("down") => Thumb::Down,
                _ => return Err("Give a thumbs up or down.".into()),
            },
            rewrite: f.nonempty("rewrite").map(str::to_string),
            notes,
        },
        Kind::Demo => Label::Demo {
            text: f
                .nonempty("text")
                .ok_or("Write an answer first.")?
                .to_string(),
            notes,
        },
    };
    label.validate(kind, n).map_err(|e| e.to_string())?;
    Ok(label)
}

/// Time on the page: the browser's measure when it sent one, else the server's.
fn lead_time(f: &FormData) -> Option<i64> {
    const DAY: i64 = 24 * 3600 * 1000;
    f.get("lead_time_ms")
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| v.is_finite())
        .map(|v| v.round() as i64)
        .or_else(|| {
            f.get("shown_at")
                .and_then(|v| v.parse::<i64>().ok())
                .map(|t| now_ms() - t)
        })
        .filter(|&ms| (0..DAY).contains(&ms))
}

async fn submit(
    State(app): State<Shared>,
    a: Auth,
    Path((pid, iid)): Path<(i64, i64)>,
    Form(form): Form<FormData>,
) -> Response {
    if let Err(r) = check_csrf(&app, &a, &form) {
        return r;
    }
    let r = app
        .pool
        .run(move |s| {
            let Some(p) = s.project_by_id(pid)? else {
                return Ok(None);
            };
            let Some(item) = s.item(iid)?.filter(|i| i.project_id == pid) else {
                return Ok(None);
            };
            Ok(Some((p.kind, item.candidates.len())))
        })
        .await;
    let (kind, n) = match r {
        Ok(Some(x)) => x,
        Ok(None) => return not_found(State(app)).await,
        Err(e) => return internal(&app, e),
    };
    let label = match label_from_form(kind, n, &form) {
        Ok(l) => l,
        Err(msg) => {
            return show_item(&app, &a, pid, iid, None, Some(msg), StatusCode::BAD_REQUEST).await
        }
    };
    let (uid, lead) = (a.user.id, lead_time(&form));
    match app
        .pool
        .write(move |s| s.submit(iid, uid, &label, lead))
        .await
    {
        Ok(_) => Redirect::to(&format!("/p/{pid}")).into_response(),
        Err(e) => internal(&app, e),
    }
}

async fn skip(
    State(app): State<Shared>,
    a: Auth,
    Path((pid, iid)): Path<(i64, i64)>,
    Form(form): Form<FormData>,
) -> Response {
    if let Err(r) = check_csrf(&app, &a, &form) {
        return r;
    }
    let uid = a.user.id;
    let r = app
        .pool
        .write(move |s| {
            if s.item(iid)?.filter(|i| i.project_id == pid).is_none() {
                return Ok(false);
            }
            s.skip(iid, uid)?;
            Ok(true)
        })
        .await;
    match r {
        Ok(true) => Redirect::to(&format!("/p/{pid}")).into_response(),
        Ok(false) => not_found(State(app)).await,
        Err(e) => internal(&app, e),
    }
}

async fn my_labels(State(app): State<Shared>, a: Auth, Path(pid): Path<i64>) -> Response {
    let uid = a.user.id;
    let r = app
        .pool
        .run(move |s| {
            let Some(p) = s.project_by_id(pid)? else { return Ok(None) };
            let mut rows = Vec::new();
            for l in s.labels_of(pid, uid)? {
                let prompt = s.item(l.item_id)?.map(|i| shown(&i.prompt)).unwrap_or_default();
                rows.push(context! { id => l.id, prompt, label => serde_json::to_string(&l.label).unwrap_or_default() });
            }
            Ok(Some((p, rows)))
        })
        .await;
    match r {
        Ok(Some((project, labels))) => render(
            &app,
            "mine.html",
            context! { user => &a.user, csrf => &a.csrf, project, labels },
        ),
        Ok(None) => not_found(State(app)).await,
        Err(e) => internal(&app, e),
    }
}

/// A label of someone else's is "not found", exactly as a label that does not exist.
async fn own_label(app: &Shared, a: &Auth, lid: i64) -> Result<Option<(StoredLabel, i64)>> {
    let uid = a.user.id;
    app.pool
        .run(move |s| {
            let Some(l) = s.own_label(lid, uid)? else {
                return Ok(None);
            };
            let pid = s.item(l.item_id)?.map(|i| i.project_id).unwrap_or(0);
            Ok(Some((l, pid)))
        })
        .await
}

async fn label_page(State(app): State<Shared>, a: Auth, Path(lid): Path<i64>) -> Response {
    match own_label(&app, &a, lid).await {
        Ok(Some((l, pid))) => {
            let iid = l.item_id;
            show_item(&app, &a, pid, iid, Some(l), None, StatusCode::OK).await
        }
        Ok(None) => not_found(State(app)).await,
        Err(e) => internal(&app, e),
    }
}

async fn update_label(
    State(app): State<Shared>,
    a: Auth,
    Path(lid): Path<i64>,
    Form(form): Form<FormData>,
) -> Response {
    if let Err(r) = check_csrf(&app, &a, &form) {
        return r;
    }
    let (old, pid) = match own_label(&app, &a, lid).await {
        Ok(Some(x)) => x,
        Ok(None) => return not_found(State(app)).await,
        Err(e) => return internal(&app, e),
    };
    let iid = old.item_id;
    let n = match app
        .pool
        .run(move |s| Ok(s.item(iid)?.map(|i| i.candidates.len())))
        .await
    {
        Ok(Some(n)) => n,
        Ok(None) => return not_found(State(app)).await,
        Err(e) => return internal(&app, e),
    };
    let label = match label_from_form(old.label.kind(), n, &form) {
        Ok(l) => l,
        Err(msg) => {
            return show_item(
                &app,
                &a,
                pid,
                iid,
                Some(old),
                Some(msg),
                StatusCode::BAD_REQUEST,
            )
            .await
        }
    };
    let uid = a.user.id;
    match app
        .pool
        .write(move |s| s.update_label(lid, uid, &label))
        .await
    {
        Ok(true) => Redirect::to(&format!("/p/{pid}/mine")).into_response(),
        Ok(false) => not_found(State(app)).await,
        Err(e) => internal(&app, e),
    }
}

async fn admin(State(app): State<Shared>, a: Auth) -> Response {
    if !a.user.is_admin {
        // Not "forbidden": an annotator learns nothing about what admins see.
        return not_found(State(app)).await;
    }
    let r = app
        .pool
        .run(|s| {
            s.snapshot(|s| {
                let mut rows = Vec::new();
                for p in s.projects()? {
                    let progress = s.progress(&p)?;
                    let labels = s.labels(p.id)?;
                    let agreement = project_agreement(p.kind, &labels);
                    rows.push(context! { project => p, progress, agreement });
                }
                Ok(rows)
            })
        })
        .await;
    match r {
        Ok(projects) => render(
            &app,
            "admin.html",
            context! { user => &a.user, csrf => &a.csrf, projects },
        ),
        Err(e) => internal(&app, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(fields: &[(&str, &str)]) -> FormData {
        FormData(
            fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn rank_inputs_become_groups_with_ties_and_gaps() {
        let f = form(&[
            ("rank_0", "2"),
            ("rank_1", "1"),
            ("rank_2", ""),
            ("rank_3", "2"),
        ]);
        let l = label_from_form(Kind::Rank, 4, &f).unwrap();
        assert_eq!(
            l,
            Label::Rank {
                ranking: vec![vec![1], vec![0, 3]],
                notes: Notes::default()
            }
        );
        let e = label_from_form(Kind::Rank, 4, &form(&[("rank_0", "x")])).unwrap_err();
        assert!(e.contains("answer 1"), "{e}");
    }

    #[test]
    fn pairwise_form_keeps_degree_only_with_a_winner() {
        let f = form(&[
            ("choice", "tie"),
            ("degree", "better"),
            ("safety_1", "unsafe"),
        ]);
        let l = label_from_form(Kind::Pairwise, 2, &f).unwrap();
        assert_eq!(
            l,
            Label::Pairwise {
                choice: Choice::Tie,
                degree: None,
                safety: vec![None, Some(rlhf_data::Safety::Unsafe)],
                notes: Notes::default()
            }
        );
        assert!(label_from_form(Kind::Pairwise, 2, &form(&[])).is_err());
    }

    #[test]
    fn cookies_are_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; rlhf_session=xyz; b=2"),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("xyz"));
        assert_eq!(cookie(&h, LOGIN_COOKIE), None);
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
    }
}
