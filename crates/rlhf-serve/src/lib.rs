//! `rlhf serve`: an OpenAI-compatible server for a model directory.
//!
//! `/v1/chat/completions` (through the model's chat template; streamed by server-sent events
//! when asked), `/v1/completions`, `/v1/models`, and for reward models `/v1/score` in
//! OpenRLHF's remote reward-model shape (`{"query": [...]}` → `{"rewards": [...]}`).
//!
//! One engine thread owns the model ([`engine`]) and decodes every running request in one
//! batch, which a new request joins at the next step (continuous batching). The HTTP side
//! ([`api`]) parses and checks requests, renders and tokenises prompts, and turns the
//! engine's tokens into text ([`text`]).
//!
//! Security: 127.0.0.1 unless told otherwise; any other address needs an API key (read from
//! an environment variable, never from the command line), which every request must then
//! carry as `Authorization: Bearer KEY`.

pub mod api;
pub mod engine;
pub mod text;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rlhf_model::tokenizer::Tokenizer;

/// Errors of starting a server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model or tokenizer failed to load or run.
    #[error(transparent)]
    Model(#[from] rlhf_model::Error),
    /// A file or socket operation failed.
    #[error("{path}: {source}")]
    Io {
        /// What was being read, written or bound.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The options do not make sense together.
    #[error("{0}")]
    Invalid(String),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Model directory (Hugging Face format, or a PEFT adapter directory over its base).
    pub model: PathBuf,
    /// A PEFT adapter to apply.
    pub adapter: Option<PathBuf>,
    /// Where to listen.
    pub bind: SocketAddr,
    /// The key every request must carry (`Authorization: Bearer KEY`); required off loopback.
    pub api_key: Option<String>,
    /// Rows decoded together at most; more requests wait for a free row.
    pub max_batch_size: usize,
    /// The model's name in requests and `/v1/models` (default: the model directory's name).
    pub served_model_name: Option<String>,
    /// Keep a language model's frozen linear weights in bf16 for decoding
    /// (`Model::keep_frozen_in_bf16_for_decoding`; `rlhf serve` turns it on unless
    /// `--dtype f32`); off here.
    pub bf16_weights: bool,
}

impl ServeOptions {
    /// Serving `model` on 127.0.0.1:8000, 32 rows at a time, without a key.
    pub fn new(model: PathBuf) -> Self {
        ServeOptions {
            model,
            adapter: None,
            bind: SocketAddr::from(([127, 0, 0, 1], 8000)),
            api_key: None,
            max_batch_size: 32,
            served_model_name: None,
            bf16_weights: false,
        }
    }

    /// The refusal to serve off loopback without a key (anyone who could reach the port
    /// could use the machine's CPU), and an empty key.
    pub fn check(&self) -> Result<()> {
        if self.api_key.as_deref() == Some("") {
            return Err(Error::Invalid(
                "the API key is empty; set the variable named by --api-key-env to a secret".into(),
            ));
        }
        if !self.bind.ip().is_loopback() && self.api_key.is_none() {
            return Err(Error::Invalid(format!(
                "refusing to serve on {} without an API key: anyone who can reach it could use \
                 this machine. Pass --api-key-env VAR with the key in the environment variable \
                 VAR, or bind 127.0.0.1",
                self.bind
            )));
        }
        if self.max_batch_size == 0 {
            return Err(Error::Invalid("--max-batch-size must be at least 1".into()));
        }
        Ok(())
    }
}

/// A loaded model ready to serve.
pub struct App {
    /// The engine thread.
    pub engine: engine::EngineHandle,
    /// The model's tokenizer (the adapter's where it has one).
    pub tokenizer: Tokenizer,
    /// Each token's text and bytes for log-probability answers.
    pub token_texts: text::TokenTexts,
    /// The model's name in requests.
    pub name: String,
    /// The key requests must carry, if any.
    pub api_key: Option<String>,
}

impl App {
    /// Checks the options and loads the tokenizer and the model (on the engine's thread).
    pub fn load(opts: &ServeOptions) -> Result<Arc<App>> {
        opts.check()?;
        let tok = load_tokenizer(&opts.model, opts.adapter.as_deref())?;
        let engine = engine::start(engine::EngineOptions {
            model: opts.model.clone(),
            adapter: opts.adapter.clone(),
            max_batch_size: opts.max_batch_size,
            tokenizer: tok.clone(),
            bf16_weights: opts.bf16_weights,
        })?;
        let name = opts.served_model_name.clone().unwrap_or_else(|| {
            opts.model
                .canonicalize()
                .unwrap_or_else(|_| opts.model.clone())
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into())
        });
        Ok(Arc::new(App {
            engine,
            token_texts: text::TokenTexts::new(&tok),
            tokenizer: tok,
            name,
            api_key: opts.api_key.clone(),
        }))
    }
}

/// The tokenizer of a model directory, the adapter's taking precedence (PEFT saves the
/// tokenizer beside the adapter when it changed).
fn load_tokenizer(model: &Path, adapter: Option<&Path>) -> Result<Tokenizer> {
    if let Some(a) = adapter {
        if a.join("tokenizer.json").exists() {
            return Ok(Tokenizer::from_dir(a)?);
        }
    }
    Ok(Tokenizer::from_dir(model)?)
}

/// Serves `app` on `listener` until `shutdown` completes.
pub async fn serve(
    app: Arc<App>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let addr = listener.local_addr().ok();
    axum::serve(listener, api::router(app))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|source| Error::Io {
            path: PathBuf::from(addr.map(|a| a.to_string()).unwrap_or_default()),
            source,
        })
}

/// Loads the model and serves with a tokio runtime of its own until Ctrl-C.
pub fn run(opts: ServeOptions) -> Result<()> {
    let app = App::load(&opts)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|source| Error::Io {
            path: PathBuf::from("<tokio runtime>"),
            source,
        })?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(opts.bind)
            .await
            .map_err(|source| Error::Io {
                path: PathBuf::from(opts.bind.to_string()),
                source,
            })?;
        let addr = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        tracing::info!(
            "serving {} as {:?} ({}) on http://{addr}/v1{}",
            opts.model.display(),
            app.name,
            match app.engine.info.task {
                engine::Task::Generate => "chat and completions",
                engine::Task::Score => "a reward model: /v1/score",
            },
            if app.api_key.is_some() {
                " (API key required)"
            } else {
                ""
            }
        );
        serve(app, listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
    })
}
