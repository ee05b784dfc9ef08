//! `rlhf feedback`: the labelling app and its database (serve, import, generate, export, user).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rlhf_feedback::export::{self, Aggregate, ExportOptions, Format};
use rlhf_feedback::import::{import_file, ImportOptions};
use rlhf_feedback::server::{self, ServeOptions};
use rlhf_feedback::{Kind, Store};
use rlhf_model::generate::{generate, GenerationConfig};
use rlhf_model::{Heads, LoadOptions, Model};
use serde_json::Value;

use crate::jsonl::Row;

/// `rlhf feedback ...`
#[derive(clap::Subcommand)]
pub enum Feedback {
    /// Serve the labelling web app (127.0.0.1:8080 unless --bind says otherwise).
    Serve {
        /// The SQLite database (created if absent).
        #[arg(long)]
        db: PathBuf,
        /// Address to listen on; anything but loopback needs accounts (`feedback user add`).
        #[arg(long, default_value = "127.0.0.1:8080")]
        bind: SocketAddr,
        /// Hours a sign-in lasts.
        #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u64).range(1..=8760))]
        session_hours: u64,
    },
    /// Load prompts, or prompts with answers, into a project (JSONL, Parquet, or a Label
    /// Studio task list / export as one JSON array).
    Import {
        #[arg(long)]
        db: PathBuf,
        /// Project name (created if absent).
        #[arg(long)]
        project: String,
        /// pairwise | rank | single | demo (default: from the rows' number of answers).
        #[arg(long)]
        kind: Option<String>,
        /// How many people label each item.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        annotators_per_item: Option<u32>,
        /// Instructions shown above every item.
        #[arg(long)]
        instructions: Option<String>,
        /// The file to import.
        file: PathBuf,
    },
    /// Fill in candidate answers with a model for a project's items that have none.
    Generate(GenerateArgs),
    /// Write the labels as training files.
    Export {
        #[arg(long)]
        db: PathBuf,
        /// pairs | rankings | sft | kto | labelstudio | labels
        #[arg(long)]
        format: String,
        /// Only this project (default: every project the format can use).
        #[arg(long)]
        project: Option<String>,
        /// none (a row per annotator) | majority (a row per item, with the agreement).
        #[arg(long, default_value = "none")]
        aggregate: String,
        /// Output file.
        #[arg(long, short)]
        output: PathBuf,
    },
    /// Manage annotator accounts.
    User {
        #[command(subcommand)]
        what: UserCmd,
    },
}

/// `rlhf feedback generate`
#[derive(clap::Args)]
pub struct GenerateArgs {
    #[arg(long)]
    db: PathBuf,
    #[arg(long)]
    project: String,
    /// Model directory (Hugging Face format).
    #[arg(long)]
    model: PathBuf,
    /// PEFT LoRA adapter directory to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Answers per item (default: 2 for pairwise, 4 for rank, 1 for single).
    #[arg(long)]
    num_samples: Option<usize>,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Sampling temperature (answers to compare should differ).
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Wrap plain prompts in the model's chat template as a user turn.
    #[arg(long)]
    chat: bool,
}

/// `rlhf feedback user ...`
#[derive(clap::Subcommand)]
pub enum UserCmd {
    /// Create an account; prints its login token. The password is read from the environment
    /// variable named by --password-env (never from the command line, which others can see).
    Add {
        #[arg(long)]
        db: PathBuf,
        name: String,
        /// May see the admin page (progress, agreement).
        #[arg(long)]
        admin: bool,
        /// Environment variable holding the password (without it: token login only).
        #[arg(long)]
        password_env: Option<String>,
    },
    /// List accounts.
    List {
        #[arg(long)]
        db: PathBuf,
    },
    /// Replace an account's login token; prints the new one.
    Token {
        #[arg(long)]
        db: PathBuf,
        name: String,
    },
}

/// Runs `rlhf feedback`.
pub fn run(f: Feedback) -> Result<()> {
    match f {
        Feedback::Serve {
            db,
            bind,
            session_hours,
        } => {
            let mut opts = ServeOptions::new(db);
            opts.bind = bind;
            opts.session_ttl = std::time::Duration::from_secs(session_hours * 3600);
            server::run(opts)?;
            Ok(())
        }
        Feedback::Import {
            db,
            project,
            kind,
            annotators_per_item,
            instructions,
            file,
        } => {
            let mut store = Store::open(&db)?;
            let kind = kind.as_deref().map(Kind::parse).transpose()?;
            let r = import_file(
                &mut store,
                &file,
                &ImportOptions {
                    project,
                    kind,
                    annotators_per_item,
                },
            )?;
            if let Some(text) = instructions {
                store.set_instructions(r.project.id, &text)?;
            }
            eprintln!(
                "imported {} item(s){} into {} project {:?} ({} per item)",
                r.items,
                if r.labels > 0 {
                    format!(" and {} label(s)", r.labels)
                } else {
                    String::new()
                },
                r.project.kind,
                r.project.name,
                r.project.annotators_per_item
            );
            let missing = store.items_without_candidates(r.project.id)?.len();
            if missing > 0 && r.project.kind != Kind::Demo {
                eprintln!(
                    "{missing} item(s) have no answers yet: `rlhf feedback generate --db {} \
                     --project {:?} --model DIR` fills them in",
                    db.display(),
                    r.project.name
                );
            }
            Ok(())
        }
        Feedback::Generate(a) => fill_candidates(&a),
        Feedback::Export {
            db,
            format,
            project,
            aggregate,
            output,
        } => {
            if !db.exists() {
                bail!("{}: no such feedback database", db.display());
            }
            if crate::jsonl::same_file(&output, &db) {
                bail!(
                    "--output {} is the feedback database: write the export to another file",
                    output.display()
                );
            }
            let mut store = Store::open(&db)?;
            let opts = ExportOptions {
                format: Format::parse(&format)?,
                aggregate: Aggregate::parse(&aggregate)?,
                project,
            };
            let (rows, report) = export::export(&mut store, &opts)?;
            export::write_rows(&rows, opts.format, &output)?;
            eprintln!(
                "wrote {} row(s) from {} label(s) to {}",
                report.rows,
                report.labels_read,
                output.display()
            );
            for (why, n) in &report.left_out {
                eprintln!("  left out {n}: {why}");
            }
            Ok(())
        }
        Feedback::User { what } => user(what),
    }
}

fn user(u: UserCmd) -> Result<()> {
    match u {
        UserCmd::Add {
            db,
            name,
            admin,
            password_env,
        } => {
            let password =
                match &password_env {
                    Some(var) => Some(std::env::var(var).with_context(|| {
                        format!("--password-env {var}: the variable is not set")
                    })?),
                    None => None,
                };
            let mut store = Store::open(&db)?;
            let (user, token) = store.add_user(&name, password.as_deref(), admin)?;
            eprintln!(
                "created {}{} (id {}); login token (shown once):",
                if admin { "admin " } else { "" },
                user.name,
                user.id
            );
            println!("{token}");
            Ok(())
        }
        UserCmd::List { db } => {
            let store = Store::open(&db)?;
            for u in store.users()? {
                println!(
                    "{}\t{}{}",
                    u.id,
                    u.name,
                    if u.is_admin { "\tadmin" } else { "" }
                );
            }
            Ok(())
        }
        UserCmd::Token { db, name } => {
            let mut store = Store::open(&db)?;
            println!("{}", store.reset_token(&name)?);
            Ok(())
        }
    }
}

/// `feedback generate`: K sampled answers for each item without answers, stored per item as
/// they come (an interrupted run keeps what it made and a rerun does the rest).
fn fill_candidates(a: &GenerateArgs) -> Result<()> {
    let mut store = Store::open(&a.db)?;
    let Some(project) = store.project(&a.project)? else {
        bail!(
            "{}: no project {:?} (`rlhf feedback import` creates it)",
            a.db.display(),
            a.project
        );
    };
    let (lo, hi) = project.kind.candidates();
    let k = a.num_samples.unwrap_or(match project.kind {
        Kind::Rank => 4,
        _ => lo,
    });
    if project.kind == Kind::Demo {
        bail!(
            "project {:?} asks people for demonstrations; it needs no generated answers",
            a.project
        );
    }
    if k < lo || k > hi {
        bail!(
            "--num-samples {k}: a {} project needs {lo} to {hi} answers",
            project.kind
        );
    }
    let todo = store.items_without_candidates(project.id)?;
    if todo.is_empty() {
        eprintln!("every item of {:?} has answers already", a.project);
        return Ok(());
    }
    let tok = super::load_tokenizer(&a.model, a.adapter.as_deref())?;
    let model = Model::load(
        &a.model,
        &LoadOptions {
            heads: Heads::Lm,
            adapter: a.adapter.clone(),
            ..Default::default()
        },
    )?;
    let cfg = GenerationConfig {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_k: None,
        top_p: a.top_p,
        eos_token_ids: rlhf_model::generate::eos_ids(&model, &tok),
        pad_token_id: tok.pad_or_eos_token_id().unwrap_or(0),
        seed: a.seed,
    };
    let origin = format!("generate:{}", a.model.display());
    let pb = super::progress(todo.len() as u64, "generate");
    for (n, id) in todo.iter().enumerate() {
        let Some(item) = store.item(*id)? else {
            continue;
        };
        let mut value = serde_json::Map::new();
        value.insert("prompt".into(), item.prompt.clone());
        let row = Row {
            at: rlhf_data::Location::line(Path::new("item"), n + 1),
            value,
        };
        let ids = super::generate::prompt_ids(&tok, &row, a.chat)
            .with_context(|| format!("item {id}"))?;
        let batch = vec![ids; k];
        let cfg = GenerationConfig {
            seed: a.seed.wrapping_add(*id as u64),
            ..cfg.clone()
        };
        let gens = generate(&model, &batch, &cfg)?;
        let texts = gens
            .iter()
            .map(|g| Ok(Value::from(tok.decode(&g.completion_ids, true)?)))
            .collect::<Result<Vec<_>>>()?;
        store.add_candidates(*id, &texts, &origin)?;
        pb.inc(1);
    }
    pb.finish_and_clear();
    eprintln!(
        "generated {k} answer(s) for each of {} item(s) of {:?}",
        todo.len(),
        a.project
    );
    Ok(())
}
