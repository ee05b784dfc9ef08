//! The HTTP side: OpenAI's request and response shapes, checked field by field.
//!
//! Every error is OpenAI's error object (`{"error": {"message", "type", "param", "code"}}`):
//! 400 for a bad request, naming the field in `param`; 401 for a missing or wrong key; 404
//! for an unknown model or path. Unknown fields are refused (as OpenAI does), and fields this
//! server knows but does not implement are accepted only at their no-op value (penalties 0,
//! `echo` false, ...), so that no request is silently answered differently from what it
//! asked.
//!
//! Log-probabilities are those of the model's own next-token distribution, log_softmax of
//! the logits, before temperature, top-k and top-p (vLLM's default): what a judge reading
//! P("1") against P("2") needs, whatever the sampling settings.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use rlhf_model::tokenizer::ChatMessage;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use crate::engine::{Event, Finish, GenRequest, Sampling, ScoreRequest, Task};
use crate::text::TextStream;
use crate::App;

type Shared = Arc<App>;

/// The largest request body accepted.
pub const MAX_BODY: usize = 16 * 1024 * 1024;
/// Most alternatives per token (OpenAI's limit for `top_logprobs`).
pub const MAX_TOP_LOGPROBS: i64 = 20;
/// Most choices per request.
pub const MAX_N: i64 = 128;

/// The routes.
pub fn router(app: Shared) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/v1/score", post(score))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(app)
}

/// An error in OpenAI's shape.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
    code: Option<&'static str>,
}

impl ApiError {
    fn bad(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: None,
        }
    }

    fn request(message: impl Into<String>) -> Self {
        ApiError {
            param: None,
            ..ApiError::bad("", message)
        }
    }

    fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    fn stopped() -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            ..ApiError::internal("the model's engine has stopped; restart the server")
        }
    }

    fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

type Reply = std::result::Result<Response, ApiError>;

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: Some("not_found"),
        ..ApiError::request(
            "no such route; this server has POST /v1/chat/completions, POST /v1/completions, \
             GET /v1/models and POST /v1/score",
        )
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        ..ApiError::request("method not allowed on this route")
    }
}

/// Checks `Authorization: Bearer KEY` where the server has a key.
fn authorize(app: &App, headers: &HeaderMap) -> std::result::Result<(), ApiError> {
    let Some(key) = &app.api_key else {
        return Ok(());
    };
    let unauthorized = |message: &str| ApiError {
        status: StatusCode::UNAUTHORIZED,
        code: Some("invalid_api_key"),
        ..ApiError::request(message)
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            unauthorized(
                "no API key given: pass it as the header `Authorization: Bearer KEY` (the \
                 openai client's api_key)",
            )
        })?;
    // Compared in time independent of where the strings differ.
    let same = given.len() == key.len()
        && given
            .bytes()
            .zip(key.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if !same {
        return Err(unauthorized("incorrect API key provided"));
    }
    Ok(())
}

/// A request body's fields, taken one by one; what is left at the end is unknown.
struct Fields(Map<String, Value>);

impl Fields {
    fn parse(body: std::result::Result<Bytes, BytesRejection>) -> Result<Self, ApiError> {
        let body = body.map_err(|e| ApiError {
            status: e.status(),
            ..ApiError::request(format!("could not read the request body: {e}"))
        })?;
        match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Object(m)) => Ok(Fields(m)),
            Ok(_) => Err(ApiError::request("the request body must be a JSON object")),
            Err(e) => Err(ApiError::request(format!(
                "could not parse the JSON body of your request ({e}); the body must be a JSON \
                 object"
            ))),
        }
    }

    /// The value of `key`; null counts as absent.
    fn take(&mut self, key: &str) -> Option<Value> {
        self.0.remove(key).filter(|v| !v.is_null())
    }

    fn number(&mut self, key: &str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
        let Some(v) = self.take(key) else {
            return Ok(None);
        };
        match v.as_f64() {
            Some(x) if (lo..=hi).contains(&x) => Ok(Some(x)),
            Some(x) => Err(ApiError::bad(
                key,
                format!("'{key}' must be between {lo} and {hi}, got {x}"),
            )),
            None => Err(ApiError::bad(
                key,
                format!("'{key}' must be a number, got {v}"),
            )),
        }
    }

    fn integer(&mut self, key: &str, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
        let Some(v) = self.take(key) else {
            return Ok(None);
        };
        match v.as_i64() {
            Some(x) if (lo..=hi).contains(&x) => Ok(Some(x)),
            Some(x) => Err(ApiError::bad(
                key,
                format!("'{key}' must be an integer from {lo} to {hi}, got {x}"),
            )),
            None => Err(ApiError::bad(
                key,
                format!("'{key}' must be an integer, got {v}"),
            )),
        }
    }

    fn boolean(&mut self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(v) => Err(ApiError::bad(
                key,
                format!("'{key}' must be true or false, got {v}"),
            )),
        }
    }

    /// A field this server accepts only at its no-op value.
    fn only(&mut self, key: &str, ok: impl Fn(&Value) -> bool, what: &str) -> Result<(), ApiError> {
        match self.take(key) {
            Some(v) if !ok(&v) => Err(ApiError::bad(
                key,
                format!("'{key}' is not supported by this server (only {what}), got {v}"),
            )),
            _ => Ok(()),
        }
    }

    /// Refuses what was not taken.
    fn done(self) -> Result<(), ApiError> {
        match self.0.keys().next() {
            Some(k) => Err(ApiError::bad(
                k.as_str(),
                format!("unrecognized request argument supplied: {k}"),
            )),
            None => Ok(()),
        }
    }
}

/// How a request is answered, beside its prompts.
struct Params {
    sampling: Sampling,
    /// Whether max_tokens was given (else it fills the context).
    max_tokens_given: bool,
    n: usize,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
}

/// The fields chat and completions share.
fn params(f: &mut Fields, app: &App, chat: bool) -> Result<Params, ApiError> {
    if let Some(m) = f.take("model") {
        match m.as_str() {
            Some(name) if name == app.name => {}
            Some(name) => {
                return Err(ApiError {
                    status: StatusCode::NOT_FOUND,
                    code: Some("model_not_found"),
                    ..ApiError::bad(
                        "model",
                        format!(
                            "the model `{name}` does not exist; this server serves `{}`",
                            app.name
                        ),
                    )
                })
            }
            None => return Err(ApiError::bad("model", "'model' must be a string")),
        }
    }
    match app.engine.info.task {
        Task::Generate => {}
        Task::Score => {
            return Err(ApiError::request(format!(
                "`{}` is a reward model (a score head, no language-model head): it serves \
                 POST /v1/score only",
                app.name
            )))
        }
    }
    let mut max_tokens = f.integer("max_tokens", 1, i64::MAX)?;
    if chat {
        if let Some(m) = f.integer("max_completion_tokens", 1, i64::MAX)? {
            max_tokens = Some(m);
        }
    }
    let temperature = f.number("temperature", 0.0, 2.0)?.unwrap_or(1.0);
    let top_p = f.number("top_p", 0.0, 1.0)?;
    if top_p == Some(0.0) {
        return Err(ApiError::bad("top_p", "'top_p' must be above 0, got 0"));
    }
    // vLLM's extension; -1 and 0 mean no limit.
    let top_k = f
        .integer("top_k", -1, i64::MAX)?
        .filter(|&k| k > 0)
        .map(|k| k as usize);
    let n = f.integer("n", 1, MAX_N)?.unwrap_or(1) as usize;
    let seed = match f.take("seed") {
        None => None,
        Some(v) => match (v.as_i64(), v.as_u64()) {
            (Some(s), _) => Some(s as u64),
            (None, Some(s)) => Some(s),
            _ => {
                return Err(ApiError::bad(
                    "seed",
                    format!("'seed' must be an integer, got {v}"),
                ))
            }
        },
    };
    let stop = match f.take("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(a)) => a
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                v => Err(ApiError::bad(
                    "stop",
                    format!("'stop' entries must be strings, got {v}"),
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(v) => {
            return Err(ApiError::bad(
                "stop",
                format!("'stop' must be a string or a list of strings, got {v}"),
            ))
        }
    };
    if stop.iter().any(|s| s.is_empty()) {
        return Err(ApiError::bad("stop", "'stop' strings must not be empty"));
    }
    let stream = f.boolean("stream")?.unwrap_or(false);
    let include_usage = match f.take("stream_options") {
        None => false,
        Some(Value::Object(mut o)) => {
            let u = match o.remove("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => b,
                Some(v) => {
                    return Err(ApiError::bad(
                        "stream_options.include_usage",
                        format!("'include_usage' must be true or false, got {v}"),
                    ))
                }
            };
            if let Some(k) = o.keys().next() {
                return Err(ApiError::bad(
                    format!("stream_options.{k}"),
                    format!("unrecognized stream option: {k}"),
                ));
            }
            u
        }
        Some(v) => {
            return Err(ApiError::bad(
                "stream_options",
                format!("'stream_options' must be an object, got {v}"),
            ))
        }
    };
    if include_usage && !stream {
        return Err(ApiError::bad(
            "stream_options",
            "'stream_options' is only allowed when 'stream' is true",
        ));
    }
    let logprobs = if chat {
        let on = f.boolean("logprobs")?.unwrap_or(false);
        match f.integer("top_logprobs", 0, MAX_TOP_LOGPROBS)? {
            Some(_) if !on => {
                return Err(ApiError::bad(
                    "top_logprobs",
                    "'top_logprobs' needs 'logprobs' set to true",
                ))
            }
            k => on.then_some(k.unwrap_or(0) as usize),
        }
    } else {
        f.integer("logprobs", 0, MAX_TOP_LOGPROBS)?
            .map(|k| k as usize)
    };
    let ignore_eos = f.boolean("ignore_eos")?.unwrap_or(false);
    let zero = |v: &Value| v.as_f64() == Some(0.0);
    f.only("presence_penalty", zero, "0")?;
    f.only("frequency_penalty", zero, "0")?;
    f.only(
        "logit_bias",
        |v| v.as_object().is_some_and(|o| o.is_empty()),
        "{}",
    )?;
    f.take("user");
    if chat {
        f.only(
            "response_format",
            |v| v.get("type").and_then(Value::as_str) == Some("text"),
            "{\"type\": \"text\"}",
        )?;
    } else {
        f.only("echo", |v| v == &Value::Bool(false), "false")?;
        f.only("best_of", |v| v.as_i64() == Some(1), "1")?;
        f.only("suffix", |v| v.as_str() == Some(""), "\"\"")?;
    }
    Ok(Params {
        sampling: Sampling {
            max_tokens: max_tokens.unwrap_or(if chat { i64::MAX } else { 16 }) as usize,
            temperature,
            top_p,
            top_k,
            seed,
            logprobs,
            ignore_eos,
        },
        max_tokens_given: max_tokens.is_some(),
        n,
        stop,
        stream,
        include_usage,
    })
}

/// `messages` as chat-template turns.
fn messages(f: &mut Fields) -> Result<Vec<ChatMessage>, ApiError> {
    let Some(Value::Array(list)) = f.take("messages") else {
        return Err(ApiError::bad(
            "messages",
            "'messages' is required: a list of {\"role\", \"content\"} objects",
        ));
    };
    if list.is_empty() {
        return Err(ApiError::bad("messages", "'messages' must not be empty"));
    }
    list.into_iter()
        .enumerate()
        .map(|(i, m)| {
            let at = |k: &str| format!("messages[{i}].{k}");
            let Value::Object(mut m) = m else {
                return Err(ApiError::bad(
                    format!("messages[{i}]"),
                    format!("'messages[{i}]' must be an object with 'role' and 'content'"),
                ));
            };
            let role = match m.remove("role") {
                Some(Value::String(r)) if !r.is_empty() => r,
                _ => {
                    return Err(ApiError::bad(
                        at("role"),
                        format!("'{}' must be a non-empty string", at("role")),
                    ))
                }
            };
            let content = match m.remove("content") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s,
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.get("type").and_then(Value::as_str), p.get("text")) {
                            (Some("text"), Some(Value::String(t))) => text.push_str(t),
                            _ => {
                                return Err(ApiError::bad(
                                    format!("messages[{i}].content[{j}]"),
                                    format!(
                                        "'messages[{i}].content[{j}]': only text parts \
                                         ({{\"type\": \"text\", \"text\": ...}}) are supported"
                                    ),
                                ))
                            }
                        }
                    }
                    text
                }
                Some(v) => {
                    return Err(ApiError::bad(
                        at("content"),
                        format!(
                            "'{}' must be a string or a list of text parts, got {v}",
                            at("content")
                        ),
                    ))
                }
            };
            m.remove("name");
            if let Some(k) = m.keys().next() {
                return Err(ApiError::bad(
                    at(k),
                    format!("'{}' is not supported", at(k)),
                ));
            }
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

/// `prompt` as token ids: a string, a list of strings, a list of ids or a list of lists of ids.
fn prompts(f: &mut Fields, app: &App) -> Result<Vec<Vec<u32>>, ApiError> {
    let tok = &app.tokenizer;
    let encode = |s: &str, at: String| -> Result<Vec<u32>, ApiError> {
        tok.encode(s, true)
            .map_err(|e| ApiError::bad(at, e.to_string()))
    };
    let ids = |v: &[Value], at: String| -> Result<Vec<u32>, ApiError> {
        v.iter()
            .map(|x| match x.as_u64() {
                Some(id) if (id as usize) < app.engine.info.vocab => Ok(id as u32),
                _ => Err(ApiError::bad(
                    at.clone(),
                    format!(
                        "token ids must be integers below the vocabulary size {}, got {x}",
                        app.engine.info.vocab
                    ),
                )),
            })
            .collect()
    };
    let out = match f.take("prompt") {
        Some(Value::String(s)) => vec![encode(&s, "prompt".into())?],
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_number) => {
            vec![ids(&a, "prompt".into())?]
        }
        Some(Value::Array(a)) if !a.is_empty() => a
            .iter()
            .enumerate()
            .map(|(i, p)| match p {
                Value::String(s) => encode(s, format!("prompt[{i}]")),
                Value::Array(x) => ids(x, format!("prompt[{i}]")),
                v => Err(ApiError::bad(
                    format!("prompt[{i}]"),
                    format!("a prompt must be a string or a list of token ids, got {v}"),
                )),
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(ApiError::bad(
                "prompt",
                "'prompt' is required: a string, a list of strings, or token ids",
            ))
        }
    };
    Ok(out)
}

/// Checks each prompt against the context and settles `max_tokens`.
fn fit(prompts: &[Vec<u32>], p: &mut Params, app: &App, field: &str) -> Result<(), ApiError> {
    let context = app.engine.info.context;
    for (i, ids) in prompts.iter().enumerate() {
        let at = if prompts.len() > 1 {
            format!("{field}[{i}]")
        } else {
            field.to_string()
        };
        if ids.is_empty() {
            return Err(ApiError::bad(
                at,
                "the prompt comes out as no tokens (this tokenizer adds no BOS); give it text",
            ));
        }
        if ids.len() >= context {
            return Err(ApiError::bad(
                at,
                format!(
                    "this model's maximum context length is {context} tokens, and the prompt \
                     has {} tokens",
                    ids.len()
                ),
            ));
        }
        let room = context - ids.len();
        if p.max_tokens_given && p.sampling.max_tokens > room {
            return Err(ApiError::bad(
                "max_tokens",
                format!(
                    "this model's maximum context length is {context} tokens; you requested {} \
                     ({} in the prompt, {} in the completion): lower 'max_tokens' to at most {room}",
                    ids.len() + p.sampling.max_tokens,
                    ids.len(),
                    p.sampling.max_tokens
                ),
            ));
        }
    }
    if !p.max_tokens_given {
        let room = prompts.iter().map(|x| context - x.len()).min().unwrap_or(1);
        p.sampling.max_tokens = p.sampling.max_tokens.min(room);
    }
    Ok(())
}

async fn chat(
    State(app): State<Shared>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Reply {
    authorize(&app, &headers)?;
    let mut f = Fields::parse(body)?;
    let mut p = params(&mut f, &app, true)?;
    let msgs = messages(&mut f)?;
    f.done()?;
    let tok = &app.tokenizer;
    let ids = tok
        .apply_chat_template(&msgs, true)
        .and_then(|text| tok.encode(&text, false))
        .map_err(|e| ApiError::bad("messages", e.to_string()))?;
    let prompts = vec![ids];
    fit(&prompts, &mut p, &app, "messages")?;
    generate(app, Kind::Chat, prompts, p).await
}

async fn completions(
    State(app): State<Shared>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Reply {
    authorize(&app, &headers)?;
    let mut f = Fields::parse(body)?;
    let mut p = params(&mut f, &app, false)?;
    let prompts = prompts(&mut f, &app)?;
    f.done()?;
    fit(&prompts, &mut p, &app, "prompt")?;
    generate(app, Kind::Completion, prompts, p).await
}

async fn models(State(app): State<Shared>, headers: HeaderMap) -> Reply {
    authorize(&app, &headers)?;
    Ok(axum::Json(json!({"object": "list", "data": [model_card(&app)]})).into_response())
}

async fn model(State(app): State<Shared>, headers: HeaderMap, Path(id): Path<String>) -> Reply {
    authorize(&app, &headers)?;
    if id != app.name {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            code: Some("model_not_found"),
            ..ApiError::bad("model", format!("the model `{id}` does not exist"))
        });
    }
    Ok(axum::Json(model_card(&app)).into_response())
}

fn model_card(app: &App) -> Value {
    json!({
        "id": app.name,
        "object": "model",
        "created": now(),
        "owned_by": "rlhf-rs",
        "max_model_len": app.engine.info.context,
    })
}

/// OpenRLHF's remote reward model: `{"query": ["full text", ...]}` → `{"rewards": [...]}`.
/// Each query is scored as OpenRLHF's `serve_rm` scores it (pad and EOS text stripped from
/// both ends, one EOS appended, tokenised with special tokens), which is also how the reward
/// trainer builds a text row (TRL's rule), so a sequence scores here as it scored in training.
async fn score(
    State(app): State<Shared>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Reply {
    authorize(&app, &headers)?;
    let mut f = Fields::parse(body)?;
    let queries = match f.take("query") {
        Some(Value::Array(q)) if !q.is_empty() => q,
        _ => {
            return Err(ApiError::bad(
                "query",
                "'query' is required: a non-empty list of full texts (prompt and response)",
            ))
        }
    };
    // OpenRLHF's client sends these too; scoring reads the query alone.
    f.take("prompts");
    f.take("labels");
    f.take("model");
    f.done()?;
    if app.engine.info.task != Task::Score {
        return Err(ApiError::request(format!(
            "`{}` has no score head: /v1/score needs a reward model (`rlhf reward`'s output)",
            app.name
        )));
    }
    let tok = &app.tokenizer;
    let mut seqs = Vec::with_capacity(queries.len());
    for (i, q) in queries.iter().enumerate() {
        let at = format!("query[{i}]");
        let Some(text) = q.as_str() else {
            return Err(ApiError::bad(
                at,
                format!("each query must be a string, got {q}"),
            ));
        };
        let text = strip_special(text, &[tok.pad_token(), tok.eos_token()]);
        if text.is_empty() {
            return Err(ApiError::bad(
                at,
                "the query is empty: there is nothing to score",
            ));
        }
        let content = rlhf_data::Content::Text(text.to_string());
        let ids = rlhf_data::reward_ids(tok, None, &content)
            .map_err(|e| ApiError::bad(at.clone(), e.to_string()))?;
        if ids.len() > app.engine.info.context {
            return Err(ApiError::bad(
                at,
                format!(
                    "the query has {} tokens, past this model's maximum context length {}",
                    ids.len(),
                    app.engine.info.context
                ),
            ));
        }
        seqs.push(ids);
    }
    let (reply, rx) = tokio::sync::oneshot::channel();
    app.engine
        .score(ScoreRequest { seqs, reply })
        .map_err(|_| ApiError::stopped())?;
    let rewards = rx
        .await
        .map_err(|_| ApiError::stopped())?
        .map_err(ApiError::internal)?;
    if let Some(i) = rewards.iter().position(|r| !r.is_finite()) {
        return Err(ApiError::internal(format!(
            "the score of query[{i}] is {}: the model's weights are not finite",
            rewards[i]
        )));
    }
    Ok(axum::Json(json!({"rewards": rewards})).into_response())
}

/// `text` without `specials` (the pad and EOS strings) repeated at either end.
fn strip_special<'a>(mut text: &'a str, specials: &[Option<&str>]) -> &'a str {
    let specials: Vec<&str> = specials
        .iter()
        .flatten()
        .copied()
        .filter(|s| !s.is_empty())
        .collect();
    loop {
        let before = text.len();
        for s in &specials {
            text = text.strip_prefix(s).unwrap_or(text);
            text = text.strip_suffix(s).unwrap_or(text);
        }
        if text.len() == before {
            return text;
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

/// A generated token as log-probability answers show it.
struct TokenLogprob {
    id: u32,
    logprob: f32,
    top: Vec<(u32, f32)>,
    /// Characters of the choice's text before it.
    offset: usize,
}

/// One choice as it is being generated.
struct Choice {
    text: TextStream,
    content: String,
    tokens: usize,
    finish: Option<&'static str>,
    logprobs: Vec<TokenLogprob>,
    cancel: Arc<AtomicBool>,
}

/// What an engine event added to a choice.
struct Update {
    choice: usize,
    text: String,
    logprobs: Vec<TokenLogprob>,
    finish: Option<&'static str>,
}

/// A request's choices and its prompts' size.
struct Run {
    kind: Kind,
    id: String,
    created: u64,
    prompt_tokens: usize,
    choices: Vec<Choice>,
    logprobs: bool,
}

impl Run {
    fn apply(
        &mut self,
        tok: &rlhf_model::tokenizer::Tokenizer,
        ev: Event,
    ) -> Result<Option<Update>, ApiError> {
        let (choice, text, logprobs, finish) = match ev {
            Event::Failed { message, .. } => return Err(ApiError::internal(message)),
            Event::Token {
                choice,
                id,
                logprobs,
            } => {
                let c = &mut self.choices[choice];
                if c.finish.is_some() {
                    return Ok(None);
                }
                c.tokens += 1;
                let delta = c
                    .text
                    .push(tok, id)
                    .map_err(|e| ApiError::internal(e.to_string()))?;
                let lp = logprobs.map(|(logprob, top)| TokenLogprob {
                    id,
                    logprob,
                    top,
                    offset: c.text.offset(),
                });
                if delta.stopped {
                    c.cancel.store(true, Ordering::Relaxed);
                }
                (
                    choice,
                    delta.text,
                    lp.into_iter().collect(),
                    delta.stopped.then_some("stop"),
                )
            }
            Event::Done { choice, finish } => {
                let c = &mut self.choices[choice];
                if c.finish.is_some() {
                    return Ok(None);
                }
                let rest = c.text.finish();
                let why = match finish {
                    Finish::Eos => "stop",
                    Finish::Length => "length",
                };
                (choice, rest, Vec::new(), Some(why))
            }
        };
        let c = &mut self.choices[choice];
        c.content.push_str(&text);
        c.finish = finish;
        Ok(Some(Update {
            choice,
            text,
            logprobs,
            finish,
        }))
    }

    fn done(&self) -> bool {
        self.choices.iter().all(|c| c.finish.is_some())
    }

    fn usage(&self) -> Value {
        let completion: usize = self.choices.iter().map(|c| c.tokens).sum();
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        })
    }

    /// Log-probabilities in the endpoint's shape (`None` when not asked for).
    fn logprobs_json(&self, app: &App, lps: &[TokenLogprob]) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        let tok = &app.tokenizer;
        let texts = |id: u32| app.token_texts.get(tok, id);
        match self.kind {
            Kind::Chat => {
                let content: Vec<Value> = lps
                    .iter()
                    .map(|t| {
                        let (s, b) = texts(t.id);
                        let top: Vec<Value> = t
                            .top
                            .iter()
                            .map(|&(id, lp)| {
                                let (s, b) = texts(id);
                                json!({"token": s, "logprob": lp, "bytes": b})
                            })
                            .collect();
                        json!({"token": s, "logprob": t.logprob, "bytes": b, "top_logprobs": top})
                    })
                    .collect();
                json!({"content": content, "refusal": null})
            }
            Kind::Completion => {
                let tokens: Vec<String> = lps.iter().map(|t| texts(t.id).0).collect();
                let top: Vec<Value> = lps
                    .iter()
                    .map(|t| {
                        let m: Map<String, Value> = t
                            .top
                            .iter()
                            .map(|&(id, lp)| (texts(id).0, json!(lp)))
                            .collect();
                        Value::Object(m)
                    })
                    .collect();
                json!({
                    "tokens": tokens,
                    "token_logprobs": lps.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                    "top_logprobs": top,
                    "text_offset": lps.iter().map(|t| t.offset).collect::<Vec<_>>(),
                })
            }
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }
}

/// Queues every choice with the engine and answers, streamed or whole.
async fn generate(app: Shared, kind: Kind, prompts: Vec<Vec<u32>>, p: Params) -> Reply {
    let (events, mut rx) = mpsc::unbounded_channel();
    let n = p.n;
    let mut run = Run {
        kind,
        id: format!(
            "{}-{:032x}",
            if kind == Kind::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            },
            rand::random::<u128>()
        ),
        created: now(),
        prompt_tokens: prompts.iter().map(Vec::len).sum(),
        choices: Vec::new(),
        logprobs: p.sampling.logprobs.is_some(),
    };
    let mut reqs = Vec::with_capacity(prompts.len() * n);
    for prompt in &prompts {
        for j in 0..n {
            let cancel = Arc::new(AtomicBool::new(false));
            let mut sampling = p.sampling.clone();
            // The choices of one prompt differ; the same prompt and seed give the same choices.
            sampling.seed = sampling.seed.map(|s| s.wrapping_add(j as u64));
            reqs.push(GenRequest {
                prompt: prompt.clone(),
                sampling,
                choice: run.choices.len(),
                cancel: cancel.clone(),
                events: events.clone(),
            });
            run.choices.push(Choice {
                text: TextStream::new(p.stop.clone()),
                content: String::new(),
                tokens: 0,
                finish: None,
                logprobs: Vec::new(),
                cancel,
            });
        }
    }
    drop(events);
    app.engine.generate(reqs).map_err(|_| ApiError::stopped())?;
    if p.stream {
        return Ok(stream(app, run, rx, p.include_usage));
    }
    while !run.done() {
        let ev = rx.recv().await.ok_or_else(ApiError::stopped)?;
        if let Some(u) = run.apply(&app.tokenizer, ev)? {
            run.choices[u.choice].logprobs.extend(u.logprobs);
        }
    }
    let choices: Vec<Value> = run
        .choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let lp = run.logprobs_json(&app, &c.logprobs);
            match kind {
                Kind::Chat => json!({
                    "index": i,
                    "message": {"role": "assistant", "content": c.content},
                    "logprobs": lp,
                    "finish_reason": c.finish,
                }),
                Kind::Completion => json!({
                    "index": i,
                    "text": c.content,
                    "logprobs": lp,
                    "finish_reason": c.finish,
                }),
            }
        })
        .collect();
    Ok(axum::Json(json!({
        "id": run.id,
        "object": run.object(false),
        "created": run.created,
        "model": app.name,
        "choices": choices,
        "usage": run.usage(),
    }))
    .into_response())
}

/// Server-sent events in OpenAI's chunk shape, ending `data: [DONE]`. A client that goes
/// away stops its rows (the engine sees the dropped receiver).
fn stream(
    app: Shared,
    mut run: Run,
    mut rx: mpsc::UnboundedReceiver<Event>,
    include_usage: bool,
) -> Response {
    let (tx, body_rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let frame = |v: Value| Bytes::from(format!("data: {v}\n\n"));
        let chunk = |run: &Run, choices: Vec<Value>| {
            let mut v = json!({
                "id": run.id,
                "object": run.object(true),
                "created": run.created,
                "model": app.name,
                "choices": choices,
            });
            if include_usage {
                v["usage"] = Value::Null;
            }
            v
        };
        if run.kind == Kind::Chat {
            let first: Vec<Value> = (0..run.choices.len())
                .map(|i| {
                    json!({"index": i, "delta": {"role": "assistant", "content": ""},
                           "logprobs": null, "finish_reason": null})
                })
                .collect();
            if tx.send(frame(chunk(&run, first))).await.is_err() {
                return;
            }
        }
        while !run.done() {
            let Some(ev) = rx.recv().await else {
                let _ = tx.send(frame(ApiError::stopped().body())).await;
                return;
            };
            let u = match run.apply(&app.tokenizer, ev) {
                Ok(Some(u)) => u,
                Ok(None) => continue,
                Err(e) => {
                    let _ = tx.send(frame(e.body())).await;
                    return;
                }
            };
            let mut frames = Vec::new();
            if !u.text.is_empty() || !u.logprobs.is_empty() {
                let lp = run.logprobs_json(&app, &u.logprobs);
                let c = match run.kind {
                    Kind::Chat => json!({"index": u.choice, "delta": {"content": u.text},
                                         "logprobs": lp, "finish_reason": null}),
                    Kind::Completion => json!({"index": u.choice, "text": u.text,
                                               "logprobs": lp, "finish_reason": null}),
                };
                frames.push(chunk(&run, vec![c]));
            }
            if let Some(why) = u.finish {
                let c = match run.kind {
                    Kind::Chat => json!({"index": u.choice, "delta": {}, "logprobs": null,
                                         "finish_reason": why}),
                    Kind::Completion => json!({"index": u.choice, "text": "", "logprobs": null,
                                               "finish_reason": why}),
                };
                frames.push(chunk(&run, vec![c]));
            }
            for f in frames {
                if tx.send(frame(f)).await.is_err() {
                    for c in &run.choices {
                        c.cancel.store(true, Ordering::Relaxed);
                    }
                    return;
                }
            }
        }
        if include_usage {
            let mut v = chunk(&run, Vec::new());
            v["usage"] = run.usage();
            if tx.send(frame(v)).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
    });
    let body = futures_util::stream::unfold(body_rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_text_is_stripped_from_both_ends_only() {
        let s = [Some("<pad>"), Some("</s>")];
        assert_eq!(
            strip_special("<pad><pad>hi</s> there</s><pad>", &s),
            "hi</s> there"
        );
        assert_eq!(strip_special("</s>", &s), "");
        assert_eq!(strip_special("plain", &[None]), "plain");
    }
}
