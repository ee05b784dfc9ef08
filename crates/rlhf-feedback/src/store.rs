//! The feedback database: one SQLite file in WAL mode, its schema kept by numbered migrations
//! (`PRAGMA user_version`), every submission one `BEGIN IMMEDIATE` transaction.
//!
//! Tables: `projects` (a task kind and `annotators_per_item`), `items` (a prompt, the rest of
//! its input row as `meta`), `candidates` (the answers shown, in order), `users` (argon2
//! password hashes, SHA-256 hashes of login tokens), `sessions` (SHA-256 of the cookie, the
//! CSRF token), `assignments` (who has an item open, so an item is not handed to more people
//! than it needs), `labels` (one per item and annotator: a second submission edits it, so a
//! double click never doubles a label), `skips`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use rand::RngCore;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::error::SqlContext;
use crate::label::{Kind, Label};
use crate::time::now_ms;
use crate::{Error, Result};

/// The schema, one migration per entry; `user_version` is how many have run.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    "CREATE TABLE projects (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL CHECK (kind IN ('pairwise', 'rank', 'single', 'demo')),
        annotators_per_item INTEGER NOT NULL DEFAULT 1 CHECK (annotators_per_item >= 1),
        instructions TEXT NOT NULL DEFAULT '',
        created_at INTEGER NOT NULL
    );
    CREATE TABLE items (
        id INTEGER PRIMARY KEY,
        project_id INTEGER NOT NULL REFERENCES projects(id),
        prompt TEXT NOT NULL,
        meta TEXT NOT NULL DEFAULT '{}',
        created_at INTEGER NOT NULL
    );
    CREATE INDEX items_project ON items(project_id);
    CREATE TABLE candidates (
        id INTEGER PRIMARY KEY,
        item_id INTEGER NOT NULL REFERENCES items(id),
        position INTEGER NOT NULL,
        text TEXT NOT NULL,
        origin TEXT NOT NULL DEFAULT 'import',
        UNIQUE (item_id, position)
    );
    CREATE TABLE users (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        password_hash TEXT,
        token_hash TEXT UNIQUE,
        is_admin INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE sessions (
        id_hash TEXT PRIMARY KEY,
        user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        csrf TEXT NOT NULL,
        expires_at INTEGER NOT NULL
    );
    CREATE TABLE assignments (
        item_id INTEGER NOT NULL REFERENCES items(id),
        user_id INTEGER NOT NULL REFERENCES users(id),
        expires_at INTEGER NOT NULL,
        PRIMARY KEY (item_id, user_id)
    );
    CREATE TABLE labels (
        id INTEGER PRIMARY KEY,
        item_id INTEGER NOT NULL REFERENCES items(id),
        user_id INTEGER NOT NULL REFERENCES users(id),
        value TEXT NOT NULL,
        lead_time_ms INTEGER,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        UNIQUE (item_id, user_id)
    );
    CREATE INDEX labels_user ON labels(user_id);
    CREATE TABLE skips (
        item_id INTEGER NOT NULL REFERENCES items(id),
        user_id INTEGER NOT NULL REFERENCES users(id),
        created_at INTEGER NOT NULL,
        PRIMARY KEY (item_id, user_id)
    );",
    // 2: handing out items in O(log n): each item keeps how many more people it needs
    // (`open_slots` = annotators_per_item - labels - open reservations), and a partial index
    // holds only the items that need someone.
    "ALTER TABLE items ADD COLUMN open_slots INTEGER NOT NULL DEFAULT 1;
    UPDATE items SET open_slots = (SELECT annotators_per_item FROM projects p WHERE p.id = items.project_id)
        - (SELECT COUNT(*) FROM labels l WHERE l.item_id = items.id)
        - (SELECT COUNT(*) FROM assignments a WHERE a.item_id = items.id
           AND NOT EXISTS (SELECT 1 FROM labels l WHERE l.item_id = a.item_id AND l.user_id = a.user_id));
    DELETE FROM assignments WHERE EXISTS
        (SELECT 1 FROM labels l WHERE l.item_id = assignments.item_id AND l.user_id = assignments.user_id);
    CREATE INDEX items_open ON items(project_id, id) WHERE open_slots > 0;
    CREATE INDEX assignments_user ON assignments(user_id, expires_at);
    CREATE INDEX assignments_expiry ON assignments(expires_at);",
];

/// How long an opened item stays reserved for its annotator.
const ASSIGNMENT_MS: i64 = 30 * 60 * 1000;

/// A project: a task kind over a set of items.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Project {
    /// Row id.
    pub id: i64,
    /// Unique name.
    pub name: String,
    /// What annotators do.
    pub kind: Kind,
    /// How many people label each item.
    pub annotators_per_item: u32,
    /// Shown above every item.
    pub instructions: String,
}

/// A candidate answer shown with a prompt.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Candidate {
    /// Row id.
    pub id: i64,
    /// Position on the page (0 = A).
    pub position: usize,
    /// The answer: a string, or a message list.
    pub text: Value,
    /// Where it came from (`import`, or `generate:<model dir>`).
    pub origin: String,
}

/// An item: a prompt and its candidate answers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Item {
    /// Row id.
    pub id: i64,
    /// The project.
    pub project_id: i64,
    /// The prompt: a string, or a message list.
    pub prompt: Value,
    /// The rest of the input row (`tags`, ids...), exported with the labels.
    pub meta: Map<String, Value>,
    /// The answers, in page order.
    pub candidates: Vec<Candidate>,
}

/// A new item for [`Store::add_items`].
#[derive(Debug, Clone, PartialEq)]
pub struct NewItem {
    /// The prompt.
    pub prompt: Value,
    /// Other fields of the input row.
    pub meta: Map<String, Value>,
    /// The candidate answers.
    pub candidates: Vec<Value>,
}

/// An account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct User {
    /// Row id.
    pub id: i64,
    /// Login name.
    pub name: String,
    /// May see the admin page.
    pub is_admin: bool,
}

/// A stored label with who gave it and when.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredLabel {
    /// Row id.
    pub id: i64,
    /// The item.
    pub item_id: i64,
    /// The annotator.
    pub user_id: i64,
    /// The annotator's name.
    pub user: String,
    /// The judgement.
    pub label: Label,
    /// Time from showing the item to the submission.
    pub lead_time_ms: Option<i64>,
    /// First submission, Unix ms.
    pub created_at: i64,
    /// Last edit, Unix ms.
    pub updated_at: i64,
}

/// A project's progress, for the admin page.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Progress {
    /// Items in the project.
    pub items: usize,
    /// Items with `annotators_per_item` labels.
    pub complete: usize,
    /// Labels given.
    pub labels: usize,
    /// Skips.
    pub skips: usize,
    /// Labels per annotator name.
    pub per_user: Vec<(String, usize)>,
    /// Median lead time, seconds.
    pub median_lead_time_s: Option<f64>,
}

/// A random 256-bit token, hex.
pub fn random_token() -> String {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// SHA-256 of a token, hex: tokens and session ids are stored only as this.
pub fn token_hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// An open database.
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Store> {
        let conn = Connection::open(path).at(path)?;
        conn.busy_timeout(Duration::from_secs(10)).at(path)?;
        // WAL: readers (export, the admin page) never block the writer and see a snapshot;
        // synchronous=FULL: an acknowledged label survives a crash of the machine, not only
        // of the process.
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
        )
        .at(path)?;
        let mut store = Store {
            conn,
            path: path.to_path_buf(),
        };
        store.migrate()?;
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn migrate(&mut self) -> Result<()> {
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .at(&path)?;
        let version: usize = tx
            .query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
            .at(&path)? as usize;
        if version > MIGRATIONS.len() {
            return Err(Error::Invalid(format!(
                "{}: the database has schema version {version}, newer than this rlhf ({}); \
                 use the rlhf that wrote it",
                path.display(),
                MIGRATIONS.len()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            tx.execute_batch(sql).at(&path)?;
            tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))
                .at(&path)?;
        }
        tx.commit().at(&path)
    }

    /// Runs `f` in one `BEGIN IMMEDIATE` transaction: all of it lands, or none. Inside a
    /// batch ([`Store::begin_batch`]) it is a savepoint of the batch's transaction instead.
    fn write<T>(&mut self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let path = self.path.clone();
        if self.conn.is_autocommit() {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .at(&path)?;
            let out = f(&tx)?;
            tx.commit().at(&path)?;
            Ok(out)
        } else {
            // Dropped without `commit` (on error), a savepoint rolls back what `f` did.
            let sp = self.conn.savepoint().at(&path)?;
            let out = f(&sp)?;
            sp.commit().at(&path)?;
            Ok(out)
        }
    }

    /// Starts a group commit: the writes until [`Store::commit_batch`] share one transaction
    /// (and one fsync), each in a savepoint of its own, so one failing write undoes only itself.
    pub fn begin_batch(&mut self) -> Result<()> {
        self.conn.execute_batch("BEGIN IMMEDIATE").at(&self.path)
    }

    /// Commits the batch; on failure it is rolled back, and none of its writes happened.
    pub fn commit_batch(&mut self) -> Result<()> {
        let r = self.conn.execute_batch("COMMIT").at(&self.path);
        if r.is_err() && !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        r
    }

    /// Runs `f` in one read transaction: everything it reads is one snapshot.
    pub fn snapshot<T>(&mut self, f: impl FnOnce(&Store) -> Result<T>) -> Result<T> {
        self.conn.execute_batch("BEGIN DEFERRED").at(&self.path)?;
        let out = f(self);
        let end = self.conn.execute_batch("COMMIT").at(&self.path);
        let out = out?;
        end?;
        Ok(out)
    }

    // ---- projects and items -------------------------------------------------------------

    /// Creates a project, or returns the existing one of that name (which must have `kind`).
    pub fn ensure_project(
        &mut self,
        name: &str,
        kind: Kind,
        annotators_per_item: Option<u32>,
    ) -> Result<Project> {
        if annotators_per_item == Some(0) {
            return Err(Error::Invalid(
                "\"annotators_per_item\" must be at least 1, found 0".into(),
            ));
        }
        if let Some(p) = self.project(name)? {
            if p.kind != kind {
                return Err(Error::Invalid(format!(
                    "project {name:?} is a {} project; these rows make a {kind} task (give \
                     another --project name)",
                    p.kind
                )));
            }
            if let Some(n) = annotators_per_item.filter(|&n| n != p.annotators_per_item) {
                self.write(|tx| {
                    tx.execute(
                        "UPDATE projects SET annotators_per_item = ?1 WHERE id = ?2",
                        params![n, p.id],
                    )?;
                    tx.execute(
                        "UPDATE items SET open_slots = open_slots + ?1 WHERE project_id = ?2",
                        params![n as i64 - p.annotators_per_item as i64, p.id],
                    )?;
                    Ok(())
                })?;
                return self.project(name)?.ok_or_else(|| unreachable_project(name));
            }
            return Ok(p);
        }
        if name.trim().is_empty() || name.len() > 100 {
            return Err(Error::Invalid(
                "a project name must have 1 to 100 characters".into(),
            ));
        }
        self.conn
            .execute(
                "INSERT INTO projects (name, kind, annotators_per_item, created_at)
                 VALUES (?1, ?2, ?3, ?4)",
                params![
                    name,
                    kind.as_str(),
                    annotators_per_item.unwrap_or(1).max(1),
                    now_ms()
                ],
            )
            .at(&self.path)?;
        self.project(name)?.ok_or_else(|| unreachable_project(name))
    }

    /// Sets a project's instructions.
    pub fn set_instructions(&mut self, project_id: i64, text: &str) -> Result<()> {
        self.conn
            .execute(
                "UPDATE projects SET instructions = ?1 WHERE id = ?2",
                params![text, project_id],
            )
            .at(&self.path)?;
        Ok(())
    }

    /// The project called `name`.
    pub fn project(&self, name: &str) -> Result<Option<Project>> {
        self.project_where(
            "name = ?1",
            [rusqlite::types::Value::from(name.to_string())],
        )
    }

    /// The project with row id `id`.
    pub fn project_by_id(&self, id: i64) -> Result<Option<Project>> {
        self.project_where("id = ?1", [rusqlite::types::Value::from(id)])
    }

    fn project_where(&self, cond: &str, args: impl rusqlite::Params) -> Result<Option<Project>> {
        self.conn
            .query_row(
                &format!(
                    "SELECT id, name, kind, annotators_per_item, instructions FROM projects \
                     WHERE {cond}"
                ),
                args,
                project_row,
            )
            .optional()
            .at(&self.path)?
            .transpose()
    }

    /// How many items a project has, and how many of them `user_id` has labelled: what a
    /// page's progress line needs, counted, not loaded.
    pub fn counts(&self, project_id: i64, user_id: i64) -> Result<(usize, usize)> {
        self.conn
            .query_row(
                "SELECT (SELECT COUNT(*) FROM items WHERE project_id = ?1),
                        (SELECT COUNT(*) FROM labels l JOIN items i ON i.id = l.item_id
                         WHERE i.project_id = ?1 AND l.user_id = ?2)",
                params![project_id, user_id],
                |r| Ok((r.get::<_, i64>(0)? as usize, r.get::<_, i64>(1)? as usize)),
            )
            .at(&self.path)
    }

    /// Every project, oldest first.
    pub fn projects(&self) -> Result<Vec<Project>> {
        let mut st = self
            .conn
            .prepare(
                "SELECT id, name, kind, annotators_per_item, instructions FROM projects ORDER BY id",
            )
            .at(&self.path)?;
        let rows = st
            .query_map([], project_row)
            .at(&self.path)?
            .collect::<Result<Vec<_>, _>>()
            .at(&self.path)?;
        rows.into_iter().collect()
    }

    /// Adds items (with their candidates) to a project in one transaction; returns their ids.
    pub fn add_items(&mut self, project: &Project, items: &[NewItem]) -> Result<Vec<i64>> {
        let (lo, hi) = project.kind.candidates();
        for (i, it) in items.iter().enumerate() {
            let n = it.candidates.len();
            // Items of a kind that needs answers may come without any: `feedback generate`
            // fills them in, and until then they are not shown.
            if n != 0 && (n < lo || n > hi) {
                return Err(Error::Invalid(format!(
                    "item {} has {n} answers; a {} task needs {}",
                    i + 1,
                    project.kind,
                    if lo == hi {
                        lo.to_string()
                    } else {
                        format!("{lo} to {hi}")
                    }
                )));
            }
        }
        let now = now_ms();
        let (pid, k) = (project.id, project.annotators_per_item);
        self.write(|tx| {
            let mut ids = Vec::with_capacity(items.len());
            let mut ins_item = tx
                .prepare(
                    "INSERT INTO items (project_id, prompt, meta, created_at, open_slots)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
            let mut ins_cand = tx.prepare(
                "INSERT INTO candidates (item_id, position, text, origin) VALUES (?1, ?2, ?3, 'import')",
            )?;
            for it in items {
                ins_item.execute(params![
                    pid,
                    it.prompt.to_string(),
                    Value::Object(it.meta.clone()).to_string(),
                    now,
                    k
                ])?;
                let id = tx.last_insert_rowid();
                for (pos, c) in it.candidates.iter().enumerate() {
                    ins_cand.execute(params![id, pos as i64, c.to_string()])?;
                }
                ids.push(id);
            }
            Ok(ids)
        })
    }

    /// Appends generated candidates to an item (which must have none yet).
    pub fn add_candidates(&mut self, item_id: i64, texts: &[Value], origin: &str) -> Result<()> {
        self.write(|tx| {
            let have: i64 = tx.query_row(
                "SELECT COUNT(*) FROM candidates WHERE item_id = ?1",
                [item_id],
                |r| r.get(0),
            )?;
            if have != 0 {
                return Err(Error::Invalid(format!(
                    "item {item_id} already has {have} answers"
                )));
            }
            for (pos, t) in texts.iter().enumerate() {
                tx.execute(
                    "INSERT INTO candidates (item_id, position, text, origin) VALUES (?1, ?2, ?3, ?4)",
                    params![item_id, pos as i64, t.to_string(), origin],
                )?;
            }
            Ok(())
        })
    }

    /// The item with row id `id`, with its candidates.
    pub fn item(&self, id: i64) -> Result<Option<Item>> {
        let row = self
            .conn
            .query_row(
                "SELECT id, project_id, prompt, meta FROM items WHERE id = ?1",
                [id],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                    ))
                },
            )
            .optional()
            .at(&self.path)?;
        let Some((id, project_id, prompt, meta)) = row else {
            return Ok(None);
        };
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT id, position, text, origin FROM candidates WHERE item_id = ?1 ORDER BY position",
            )
            .at(&self.path)?;
        let candidates = st
            .query_map([id], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })
            .at(&self.path)?
            .map(|r| {
                let (id, pos, text, origin) = r.at(&self.path)?;
                Ok(Candidate {
                    id,
                    position: pos as usize,
                    text: parse_json(&text)?,
                    origin,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let meta = match parse_json(&meta)? {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        Ok(Some(Item {
            id,
            project_id,
            prompt: parse_json(&prompt)?,
            meta,
            candidates,
        }))
    }

    /// Ids of a project's items, in order.
    pub fn item_ids(&self, project_id: i64) -> Result<Vec<i64>> {
        let mut st = self
            .conn
            .prepare("SELECT id FROM items WHERE project_id = ?1 ORDER BY id")
            .at(&self.path)?;
        let ids = st
            .query_map([project_id], |r| r.get(0))
            .at(&self.path)?
            .collect::<Result<Vec<i64>, _>>()
            .at(&self.path)?;
        Ok(ids)
    }

    /// Ids of a project's items that have no candidate answers yet.
    pub fn items_without_candidates(&self, project_id: i64) -> Result<Vec<i64>> {
        let mut st = self
            .conn
            .prepare(
                "SELECT i.id FROM items i WHERE i.project_id = ?1
                 AND NOT EXISTS (SELECT 1 FROM candidates c WHERE c.item_id = i.id) ORDER BY i.id",
            )
            .at(&self.path)?;
        let ids = st
            .query_map([project_id], |r| r.get(0))
            .at(&self.path)?
            .collect::<Result<Vec<i64>, _>>()
            .at(&self.path)?;
        Ok(ids)
    }

    // ---- users and sessions -------------------------------------------------------------

    /// Creates an account. With `password`, it is stored as an argon2id hash; a login token is
    /// always made and returned once (only its SHA-256 is stored).
    pub fn add_user(
        &mut self,
        name: &str,
        password: Option<&str>,
        is_admin: bool,
    ) -> Result<(User, String)> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 64 || name.chars().any(char::is_control) {
            return Err(Error::Invalid(
                "a user name must have 1 to 64 characters and no control characters".into(),
            ));
        }
        let hash = password.map(hash_password).transpose()?;
        let token = random_token();
        let r = self.conn.execute(
            "INSERT INTO users (name, password_hash, token_hash, is_admin, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![name, hash, token_hash(&token), is_admin, now_ms()],
        );
        match r {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                return Err(Error::Invalid(format!(
                    "a user called {name:?} exists already"
                )))
            }
            r => r.at(&self.path)?,
        };
        let user = User {
            id: self.conn.last_insert_rowid(),
            name: name.to_string(),
            is_admin,
        };
        Ok((user, token))
    }

    /// Replaces a user's login token; returns the new one.
    pub fn reset_token(&mut self, name: &str) -> Result<String> {
        let token = random_token();
        let n = self
            .conn
            .execute(
                "UPDATE users SET token_hash = ?1 WHERE name = ?2",
                params![token_hash(&token), name],
            )
            .at(&self.path)?;
        if n == 0 {
            return Err(Error::Invalid(format!("no user called {name:?}")));
        }
        Ok(token)
    }

    /// Every account.
    pub fn users(&self) -> Result<Vec<User>> {
        let mut st = self
            .conn
            .prepare("SELECT id, name, is_admin FROM users ORDER BY id")
            .at(&self.path)?;
        let users = st
            .query_map([], |r| {
                Ok(User {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    is_admin: r.get(2)?,
                })
            })
            .at(&self.path)?
            .collect::<Result<Vec<_>, _>>()
            .at(&self.path)?;
        Ok(users)
    }

    /// How many accounts exist.
    pub fn user_count(&self) -> Result<usize> {
        self.conn
            .query_row("SELECT COUNT(*) FROM users", [], |r| r.get::<_, i64>(0))
            .map(|n| n as usize)
            .at(&self.path)
    }

    /// The user with this name and password, if they match.
    pub fn login_password(&self, name: &str, password: &str) -> Result<Option<User>> {
        let row = self
            .conn
            .query_row(
                "SELECT id, name, is_admin, password_hash FROM users WHERE name = ?1",
                [name],
                |r| {
                    Ok((
                        User {
                            id: r.get(0)?,
                            name: r.get(1)?,
                            is_admin: r.get(2)?,
                        },
                        r.get::<_, Option<String>>(3)?,
                    ))
                },
            )
            .optional()
            .at(&self.path)?;
        match row {
            Some((user, Some(hash))) if verify_password(&hash, password) => Ok(Some(user)),
            Some(_) => Ok(None),
            None => {
                // Spend the same time on an unknown name as on a wrong password.
                let _ = verify_password(DUMMY_HASH.get_or_init(dummy_hash), password);
                Ok(None)
            }
        }
    }

    /// The user whose login token this is.
    pub fn login_token(&self, token: &str) -> Result<Option<User>> {
        self.conn
            .query_row(
                "SELECT id, name, is_admin FROM users WHERE token_hash = ?1",
                [token_hash(token)],
                |r| {
                    Ok(User {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        is_admin: r.get(2)?,
                    })
                },
            )
            .optional()
            .at(&self.path)
    }

    /// Opens a session for `user`; returns (session id for the cookie, CSRF token).
    pub fn create_session(&mut self, user_id: i64, ttl: Duration) -> Result<(String, String)> {
        let id = random_token();
        let csrf = random_token();
        let now = now_ms();
        self.conn
            .execute(
                "INSERT INTO sessions (id_hash, user_id, csrf, expires_at) VALUES (?1, ?2, ?3, ?4)",
                params![token_hash(&id), user_id, csrf, now + ttl.as_millis() as i64],
            )
            .at(&self.path)?;
        // Old sessions go as new ones come.
        self.conn
            .execute("DELETE FROM sessions WHERE expires_at < ?1", [now])
            .at(&self.path)?;
        Ok((id, csrf))
    }

    /// The user and CSRF token of a live session.
    pub fn session(&self, session_id: &str) -> Result<Option<(User, String)>> {
        self.conn
            .query_row(
                "SELECT u.id, u.name, u.is_admin, s.csrf FROM sessions s JOIN users u ON u.id = s.user_id
                 WHERE s.id_hash = ?1 AND s.expires_at > ?2",
                params![token_hash(session_id), now_ms()],
                |r| {
                    Ok((
                        User {
                            id: r.get(0)?,
                            name: r.get(1)?,
                            is_admin: r.get(2)?,
                        },
                        r.get(3)?,
                    ))
                },
            )
            .optional()
            .at(&self.path)
    }

    /// Ends a session.
    pub fn delete_session(&mut self, session_id: &str) -> Result<()> {
        self.conn
            .execute(
                "DELETE FROM sessions WHERE id_hash = ?1",
                [token_hash(session_id)],
            )
            .at(&self.path)?;
        Ok(())
    }

    // ---- labelling ----------------------------------------------------------------------

    /// The item `user` should label next in `project`, reserved for them for 30 minutes: one
    /// they have open already, else the first (by id) that still needs people, counting others'
    /// open reservations (so items finish in order); `None` when nothing is left for them.
    /// Costs a few index lookups, however many items the project has.
    pub fn next_item(&mut self, project: &Project, user_id: i64) -> Result<Option<i64>> {
        let now = now_ms();
        let needs_candidates = project.kind != Kind::Demo;
        let pid = project.id;
        self.write(|tx| {
            // Reservations that ran out give their place back.
            tx.execute(
                "UPDATE items SET open_slots = open_slots + 1 WHERE id IN
                 (SELECT item_id FROM assignments WHERE expires_at <= ?1)",
                [now],
            )?;
            tx.execute("DELETE FROM assignments WHERE expires_at <= ?1", [now])?;
            let open: Option<i64> = tx
                .query_row(
                    "SELECT a.item_id FROM assignments a JOIN items i ON i.id = a.item_id
                     WHERE a.user_id = ?1 AND i.project_id = ?2 ORDER BY a.item_id LIMIT 1",
                    params![user_id, pid],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(id) = open {
                tx.execute(
                    "UPDATE assignments SET expires_at = ?1 WHERE item_id = ?2 AND user_id = ?3",
                    params![now + ASSIGNMENT_MS, id, user_id],
                )?;
                return Ok(Some(id));
            }
            let id: Option<i64> = tx
                .query_row(
                    "SELECT i.id FROM items i INDEXED BY items_open
                     WHERE i.project_id = ?1 AND i.open_slots > 0
                       AND NOT EXISTS (SELECT 1 FROM labels l WHERE l.item_id = i.id AND l.user_id = ?2)
                       AND NOT EXISTS (SELECT 1 FROM skips s WHERE s.item_id = i.id AND s.user_id = ?2)
                       AND (?3 = 0 OR EXISTS (SELECT 1 FROM candidates c WHERE c.item_id = i.id))
                     ORDER BY i.id LIMIT 1",
                    params![pid, user_id, needs_candidates],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(id) = id {
                tx.execute(
                    "INSERT INTO assignments (item_id, user_id, expires_at) VALUES (?1, ?2, ?3)",
                    params![id, user_id, now + ASSIGNMENT_MS],
                )?;
                tx.execute(
                    "UPDATE items SET open_slots = open_slots - 1 WHERE id = ?1",
                    [id],
                )?;
            }
            Ok(id)
        })
    }

    /// Stores `user`'s label of `item` in one transaction (replacing their earlier label of
    /// it, so a resubmission never doubles); returns the label's id.
    pub fn submit(
        &mut self,
        item_id: i64,
        user_id: i64,
        label: &Label,
        lead_time_ms: Option<i64>,
    ) -> Result<i64> {
        let now = now_ms();
        let value = label.to_json();
        self.write(|tx| {
            let (kind, n) = item_kind(tx, item_id)?;
            label.validate(kind, n)?;
            // A first label takes a place: the one reserved for it, or else a free one.
            let reserved = tx.execute(
                "DELETE FROM assignments WHERE item_id = ?1 AND user_id = ?2",
                params![item_id, user_id],
            )? > 0;
            let relabel = tx
                .query_row(
                    "SELECT 1 FROM labels WHERE item_id = ?1 AND user_id = ?2",
                    params![item_id, user_id],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            if !reserved && !relabel {
                tx.execute(
                    "UPDATE items SET open_slots = open_slots - 1 WHERE id = ?1",
                    [item_id],
                )?;
            }
            let id: i64 = tx.query_row(
                "INSERT INTO labels (item_id, user_id, value, lead_time_ms, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5)
                 ON CONFLICT (item_id, user_id) DO UPDATE SET value = excluded.value,
                     lead_time_ms = excluded.lead_time_ms, updated_at = excluded.updated_at
                 RETURNING id",
                params![item_id, user_id, value, lead_time_ms, now],
                |r| r.get(0),
            )?;
            tx.execute(
                "DELETE FROM skips WHERE item_id = ?1 AND user_id = ?2",
                params![item_id, user_id],
            )?;
            Ok(id)
        })
    }

    /// Edits label `label_id`, which must be `user_id`'s own; `Ok(false)` when it is not
    /// (another's label or none: the caller cannot tell which).
    pub fn update_label(&mut self, label_id: i64, user_id: i64, label: &Label) -> Result<bool> {
        let now = now_ms();
        let value = label.to_json();
        self.write(|tx| {
            let item: Option<i64> = tx
                .query_row(
                    "SELECT item_id FROM labels WHERE id = ?1 AND user_id = ?2",
                    params![label_id, user_id],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(item) = item else { return Ok(false) };
            let (kind, n) = item_kind(tx, item)?;
            label.validate(kind, n)?;
            tx.execute(
                "UPDATE labels SET value = ?1, updated_at = ?2 WHERE id = ?3 AND user_id = ?4",
                params![value, now, label_id, user_id],
            )?;
            Ok(true)
        })
    }

    /// `user` passes on `item`.
    pub fn skip(&mut self, item_id: i64, user_id: i64) -> Result<()> {
        let now = now_ms();
        self.write(|tx| {
            tx.execute(
                "INSERT OR IGNORE INTO skips (item_id, user_id, created_at) VALUES (?1, ?2, ?3)",
                params![item_id, user_id, now],
            )?;
            if tx.execute(
                "DELETE FROM assignments WHERE item_id = ?1 AND user_id = ?2",
                params![item_id, user_id],
            )? > 0
            {
                tx.execute(
                    "UPDATE items SET open_slots = open_slots + 1 WHERE id = ?1",
                    [item_id],
                )?;
            }
            Ok(())
        })
    }

    /// Label `label_id` if it is `user_id`'s own.
    pub fn own_label(&self, label_id: i64, user_id: i64) -> Result<Option<StoredLabel>> {
        Ok(self
            .labels_where("l.id = ?1 AND l.user_id = ?2", params![label_id, user_id])?
            .pop())
    }

    /// `user_id`'s labels in a project, newest first.
    pub fn labels_of(&self, project_id: i64, user_id: i64) -> Result<Vec<StoredLabel>> {
        let mut v = self.labels_where(
            "i.project_id = ?1 AND l.user_id = ?2",
            params![project_id, user_id],
        )?;
        v.reverse();
        Ok(v)
    }

    /// Every label of a project, by label id.
    pub fn labels(&self, project_id: i64) -> Result<Vec<StoredLabel>> {
        self.labels_where("i.project_id = ?1", params![project_id])
    }

    /// How many labels exist in all.
    pub fn label_count(&self) -> Result<usize> {
        self.conn
            .query_row("SELECT COUNT(*) FROM labels", [], |r| r.get::<_, i64>(0))
            .map(|n| n as usize)
            .at(&self.path)
    }

    fn labels_where(&self, cond: &str, args: impl rusqlite::Params) -> Result<Vec<StoredLabel>> {
        let sql = format!(
            "SELECT l.id, l.item_id, l.user_id, u.name, p.kind, l.value, l.lead_time_ms,
                    l.created_at, l.updated_at
             FROM labels l JOIN items i ON i.id = l.item_id JOIN projects p ON p.id = i.project_id
             JOIN users u ON u.id = l.user_id WHERE {cond} ORDER BY l.id"
        );
        let mut st = self.conn.prepare_cached(&sql).at(&self.path)?;
        let rows = st
            .query_map(args, |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, Option<i64>>(6)?,
                    r.get::<_, i64>(7)?,
                    r.get::<_, i64>(8)?,
                ))
            })
            .at(&self.path)?
            .collect::<Result<Vec<_>, _>>()
            .at(&self.path)?;
        rows.into_iter()
            .map(|(id, item_id, user_id, user, kind, value, lead, c, u)| {
                Ok(StoredLabel {
                    id,
                    item_id,
                    user_id,
                    user,
                    label: Label::from_json(Kind::parse(&kind)?, &value)?,
                    lead_time_ms: lead,
                    created_at: c,
                    updated_at: u,
                })
            })
            .collect()
    }

    /// A project's progress.
    pub fn progress(&self, project: &Project) -> Result<Progress> {
        let q = |sql: &str| -> Result<usize> {
            self.conn
                .query_row(sql, params![project.id, project.annotators_per_item], |r| {
                    r.get::<_, i64>(0)
                })
                .map(|n| n as usize)
                .at(&self.path)
        };
        let items = q("SELECT COUNT(*) FROM items WHERE project_id = ?1 AND ?2 = ?2")?;
        let complete = q("SELECT COUNT(*) FROM items i WHERE i.project_id = ?1
             AND (SELECT COUNT(*) FROM labels l WHERE l.item_id = i.id) >= ?2")?;
        let skips = q(
            "SELECT COUNT(*) FROM skips s JOIN items i ON i.id = s.item_id
             WHERE i.project_id = ?1 AND ?2 = ?2",
        )?;
        let labels = self.labels(project.id)?;
        let mut per_user: Vec<(String, usize)> = Vec::new();
        for l in &labels {
            match per_user.iter_mut().find(|(n, _)| *n == l.user) {
                Some((_, c)) => *c += 1,
                None => per_user.push((l.user.clone(), 1)),
            }
        }
        let mut leads: Vec<i64> = labels.iter().filter_map(|l| l.lead_time_ms).collect();
        leads.sort_unstable();
        let median_lead_time_s = (!leads.is_empty()).then(|| {
            let m = leads.len() / 2;
            let ms = if leads.len() % 2 == 1 {
                leads[m] as f64
            } else {
                (leads[m - 1] + leads[m]) as f64 / 2.0
            };
            ms / 1000.0
        });
        Ok(Progress {
            items,
            complete,
            labels: labels.len(),
            skips,
            per_user,
            median_lead_time_s,
        })
    }
}

fn unreachable_project(name: &str) -> Error {
    Error::Invalid(format!("project {name:?} vanished while being created"))
}

fn project_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Project>> {
    let kind: String = r.get(2)?;
    Ok(Kind::parse(&kind).map(|kind| Project {
        id: r.get(0).unwrap_or_default(),
        name: r.get(1).unwrap_or_default(),
        kind,
        annotators_per_item: r.get(3).unwrap_or(1),
        instructions: r.get(4).unwrap_or_default(),
    }))
}

fn item_kind(tx: &Connection, item_id: i64) -> Result<(Kind, usize)> {
    let row: Option<(String, i64)> = tx
        .query_row(
            "SELECT p.kind, (SELECT COUNT(*) FROM candidates c WHERE c.item_id = i.id)
             FROM items i JOIN projects p ON p.id = i.project_id WHERE i.id = ?1",
            [item_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let (kind, n) = row.ok_or_else(|| Error::Invalid(format!("no item {item_id}")))?;
    Ok((Kind::parse(&kind)?, n as usize))
}

fn parse_json(s: &str) -> Result<Value> {
    serde_json::from_str(s).map_err(|e| Error::Invalid(format!("a stored JSON value: {e}")))
}

/// `rusqlite::Error` inside a write closure becomes our error without a path; the store adds
/// it where it can.
impl From<rusqlite::Error> for Error {
    fn from(source: rusqlite::Error) -> Self {
        Error::Sqlite {
            path: PathBuf::from("feedback database"),
            source,
        }
    }
}

fn hash_password(password: &str) -> Result<String> {
    if password.chars().count() < 8 {
        return Err(Error::Invalid(
            "a password needs at least 8 characters".into(),
        ));
    }
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let salt =
        SaltString::encode_b64(&salt).map_err(|e| Error::Invalid(format!("password salt: {e}")))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| Error::Invalid(format!("password hash: {e}")))
}

fn verify_password(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

static DUMMY_HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn dummy_hash() -> String {
    hash_password("not a real password").unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::label::{Choice, Notes};
    use serde_json::json;

    fn pair(choice: Choice) -> Label {
        Label::Pairwise {
            choice,
            degree: None,
            safety: vec![],
            notes: Notes::default(),
        }
    }

    fn setup(k: u32) -> (tempfile::TempDir, Store, Project, Vec<i64>) {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("f.sqlite")).unwrap();
        let p = s.ensure_project("p", Kind::Pairwise, Some(k)).unwrap();
        let items: Vec<NewItem> = (0..3)
            .map(|i| NewItem {
                prompt: json!(format!("q{i}")),
                meta: Map::new(),
                candidates: vec![json!("a"), json!("b")],
            })
            .collect();
        let ids = s.add_items(&p, &items).unwrap();
        (dir, s, p, ids)
    }

    #[test]
    fn reopening_keeps_data_and_schema_version() {
        let (dir, mut s, p, ids) = setup(1);
        let (u, _) = s.add_user("ann", Some("correct horse"), false).unwrap();
        s.submit(ids[0], u.id, &pair(Choice::A), Some(1200))
            .unwrap();
        drop(s);
        let s = Store::open(&dir.path().join("f.sqlite")).unwrap();
        assert_eq!(s.labels(p.id).unwrap().len(), 1);
        let v: i64 = s
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v as usize, MIGRATIONS.len());
    }

    #[test]
    fn a_resubmission_edits_instead_of_doubling() {
        let (_d, mut s, p, ids) = setup(1);
        let (u, _) = s.add_user("ann", None, false).unwrap();
        let a = s.submit(ids[0], u.id, &pair(Choice::A), None).unwrap();
        let b = s.submit(ids[0], u.id, &pair(Choice::B), None).unwrap();
        assert_eq!(a, b);
        let labels = s.labels(p.id).unwrap();
        assert_eq!(labels.len(), 1);
        assert_eq!(labels[0].label, pair(Choice::B));
    }

    #[test]
    fn items_go_to_annotators_per_item_people_and_no_more() {
        let (_d, mut s, p, ids) = setup(2);
        let users: Vec<User> = ["a", "b", "c"]
            .iter()
            .map(|n| s.add_user(n, None, false).unwrap().0)
            .collect();
        // a and b open item 0 (reserved); c must get item 1, as item 0 has its two people.
        assert_eq!(s.next_item(&p, users[0].id).unwrap(), Some(ids[0]));
        assert_eq!(s.next_item(&p, users[1].id).unwrap(), Some(ids[0]));
        assert_eq!(s.next_item(&p, users[2].id).unwrap(), Some(ids[1]));
        // Asking again returns the item one has open.
        assert_eq!(s.next_item(&p, users[0].id).unwrap(), Some(ids[0]));
        s.submit(ids[0], users[0].id, &pair(Choice::A), None)
            .unwrap();
        assert_eq!(s.counts(p.id, users[0].id).unwrap(), (3, 1));
        assert_eq!(s.counts(p.id, users[1].id).unwrap(), (3, 0));
        // a's next is item 1 (c holds one of its two places).
        assert_eq!(s.next_item(&p, users[0].id).unwrap(), Some(ids[1]));
        s.skip(ids[1], users[0].id).unwrap();
        assert_eq!(s.next_item(&p, users[0].id).unwrap(), Some(ids[2]));
        let prog = s.progress(&p).unwrap();
        assert_eq!(
            (prog.items, prog.complete, prog.labels, prog.skips),
            (3, 0, 1, 1)
        );
    }

    #[test]
    fn labels_are_checked_against_their_item() {
        let (_d, mut s, _p, ids) = setup(1);
        let (u, _) = s.add_user("ann", None, false).unwrap();
        let rank = Label::Rank {
            ranking: vec![vec![0], vec![1]],
            notes: Notes::default(),
        };
        let e = s.submit(ids[0], u.id, &rank, None).unwrap_err().to_string();
        assert!(
            e.contains("rank label was given for a pairwise task"),
            "{e}"
        );
        assert!(s.submit(9999, u.id, &pair(Choice::A), None).is_err());
        assert_eq!(s.label_count().unwrap(), 0);
    }

    #[test]
    fn nobody_edits_anothers_label() {
        let (_d, mut s, _p, ids) = setup(2);
        let (a, _) = s.add_user("a", None, false).unwrap();
        let (b, _) = s.add_user("b", None, false).unwrap();
        let la = s.submit(ids[0], a.id, &pair(Choice::A), None).unwrap();
        assert!(!s.update_label(la, b.id, &pair(Choice::B)).unwrap());
        assert!(s.own_label(la, b.id).unwrap().is_none());
        assert_eq!(
            s.own_label(la, a.id).unwrap().unwrap().label,
            pair(Choice::A)
        );
        assert!(s.update_label(la, a.id, &pair(Choice::Tie)).unwrap());
        assert_eq!(
            s.own_label(la, a.id).unwrap().unwrap().label,
            pair(Choice::Tie)
        );
    }

    #[test]
    fn logins_by_password_and_token_and_sessions() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("f.sqlite")).unwrap();
        let (u, token) = s.add_user("ann", Some("correct horse"), true).unwrap();
        assert_eq!(
            s.login_password("ann", "correct horse").unwrap(),
            Some(u.clone())
        );
        assert_eq!(s.login_password("ann", "wrong horse!").unwrap(), None);
        assert_eq!(s.login_password("bob", "correct horse").unwrap(), None);
        assert_eq!(s.login_token(&token).unwrap(), Some(u.clone()));
        assert_eq!(s.login_token(&random_token()).unwrap(), None);
        assert!(s.add_user("ann", None, false).is_err());
        assert!(s.add_user("short", Some("1234567"), false).is_err());
        let (sid, csrf) = s.create_session(u.id, Duration::from_secs(60)).unwrap();
        assert_eq!(s.session(&sid).unwrap(), Some((u, csrf)));
        s.delete_session(&sid).unwrap();
        assert_eq!(s.session(&sid).unwrap(), None);
        // Only hashes are stored.
        let stored: String = s
            .conn
            .query_row("SELECT token_hash FROM users", [], |r| r.get(0))
            .unwrap();
        assert_ne!(stored, token);
    }
}
