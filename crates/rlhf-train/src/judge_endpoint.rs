//! A pairwise judge behind any OpenAI-compatible server (vLLM, llama.cpp's server, TGI,
//! `rlhf serve`): one chat completion per query with `max_tokens: 1, temperature: 0,
//! logprobs: true, top_logprobs: K`, and P("1") / (P("1") + P("2")) read from the first
//! token's top log-probabilities, as RLAIF reads its judge (Lee et al. 2023, §2.1).
//!
//! Every request has a timeout; a connection failure, a timeout, a 429 or a 5xx is retried
//! with exponential backoff; any other failure (a 4xx, an answer that is not a chat
//! completion with log-probs) fails at once. The client speaks plain `http://` (no TLS is
//! compiled in: put a local TLS proxy in front of a remote `https://` API).

use std::time::Duration;

use serde::Serialize;

use crate::judge::{JudgePrompt, PairwiseJudgeApi};
use crate::{Error, Result};

/// How to reach the judge.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointConfig {
    /// The API's base URL (`http://127.0.0.1:8000/v1`, as the `openai` client's `base_url`);
    /// `/chat/completions` is appended unless it ends with it already.
    pub url: String,
    /// The `model` field of each request.
    pub model: String,
    /// The bearer token, if any.
    pub api_key: Option<String>,
    /// `top_logprobs` asked for (OpenAI allows at most 20).
    pub top_logprobs: usize,
    /// Whole-request timeout.
    pub timeout: Duration,
    /// Retries after the first try, for failures worth retrying.
    pub max_retries: usize,
    /// The wait before the first retry; doubled before each next one (at most 30 s).
    pub backoff: Duration,
}

/// What one query's answer said.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// P(response 1 is better), from the "1" and "2" entries of the top log-probs.
    Prob(f64),
    /// Neither "1" nor "2" was among the top log-probs: the judge did not answer in the
    /// format; the tokens it did put first are kept for the report.
    Unparsed(String),
}

/// An OpenAI-compatible chat-completions endpoint used as a pairwise judge.
pub struct EndpointJudge {
    cfg: EndpointConfig,
    url: String,
    agent: ureq::Agent,
}

#[derive(Serialize)]
struct Request<'a> {
    model: &'a str,
    messages: [Message<'a>; 1],
    max_tokens: u32,
    temperature: f64,
    logprobs: bool,
    top_logprobs: usize,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'a str,
    content: &'a str,
}

/// Why one try failed, and whether another try may succeed.
struct Failure {
    retry: bool,
    message: String,
}

impl EndpointJudge {
    /// A client for `cfg`; refuses URLs it cannot reach (no `http://`).
    pub fn new(cfg: EndpointConfig) -> Result<Self> {
        let base = cfg.url.trim_end_matches('/');
        if base.starts_with("https://") {
            return Err(Error::Config(format!(
                "judge_url {:?}: this build speaks plain http:// only (no TLS library is \
                 compiled in); use a local server (vLLM, llama.cpp, `rlhf serve`) or a TLS proxy \
                 on localhost in front of the remote API",
                cfg.url
            )));
        }
        if !base.starts_with("http://") {
            return Err(Error::Config(format!(
                "judge_url {:?}: give the API's base URL, e.g. \"http://127.0.0.1:8000/v1\"",
                cfg.url
            )));
        }
        let url = if base.ends_with("/chat/completions") {
            base.to_string()
        } else {
            format!("{base}/chat/completions")
        };
        let agent = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .timeout_global(Some(cfg.timeout))
                .http_status_as_error(false)
                .build(),
        );
        Ok(Self { cfg, url, agent })
    }

    /// The URL requests go to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Asks one rendered query, retrying as configured; the error says what failed last and
    /// how many tries were made (the caller names the row).
    pub fn ask(&self, text: &str) -> std::result::Result<Answer, String> {
        let mut wait = self.cfg.backoff;
        let tries = self.cfg.max_retries + 1;
        for attempt in 1..=tries {
            match self.try_once(text) {
                Ok(a) => return Ok(a),
                Err(f) if f.retry && attempt < tries => {
                    tracing::warn!(
                        "judge {}: {} (try {attempt} of {tries}; retrying in {:.1}s)",
                        self.url,
                        f.message,
                        wait.as_secs_f64()
                    );
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_secs(30));
                }
                Err(f) => {
                    let tried = if f.retry {
                        format!(" (after {attempt} tries)")
                    } else {
                        String::new()
                    };
                    return Err(format!("judge {}: {}{tried}", self.url, f.message));
                }
            }
        }
        unreachable!("the last try returns")
    }

    fn try_once(&self, text: &str) -> std::result::Result<Answer, Failure> {
        let body = Request {
            model: &self.cfg.model,
            messages: [Message {
                role: "user",
                content: text,
            }],
            max_tokens: 1,
            temperature: 0.0,
            logprobs: true,
            top_logprobs: self.cfg.top_logprobs,
        };
        let mut req = self.agent.post(&self.url);
        if let Some(key) = &self.cfg.api_key {
            req = req.header("Authorization", format!("Bearer {key}"));
        }
        let mut resp = match req.send_json(&body) {
            Ok(r) => r,
            Err(e) => {
                let retry = matches!(
                    e,
                    ureq::Error::Timeout(_)
                        | ureq::Error::Io(_)
                        | ureq::Error::ConnectionFailed
                        | ureq::Error::HostNotFound
                        | ureq::Error::Protocol(_)
                );
                let message = match e {
                    ureq::Error::Timeout(_) => format!(
                        "no answer within judge_timeout_s = {}",
                        self.cfg.timeout.as_secs_f64()
                    ),
                    e => e.to_string(),
                };
                return Err(Failure { retry, message });
            }
        };
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().map_err(|e| Failure {
            retry: true,
            message: format!("reading the answer: {e}"),
        })?;
        if status != 200 {
            let hint = match status {
                401 | 403 => " (check judge_api_key_env)",
                404 => " (check judge_url: it should end in /v1, and judge_model)",
                _ => "",
            };
            return Err(Failure {
                retry: status == 429 || status >= 500,
                message: format!("HTTP {status}{hint}: {}", clip(&text, 200)),
            });
        }
        parse_answer(&text).map_err(|m| Failure {
            retry: false,
            message: m,
        })
    }
}

/// P("1" better) from a chat completion's body: the probabilities of the top log-prob
/// entries that read "1" or "2" (ignoring surrounding spaces), normalised against each other.
/// A digit missing from the list has at most the smallest listed probability, which stands
/// in for it (so one listed digit alone gives a large but not certain preference).
pub fn parse_answer(body: &str) -> std::result::Result<Answer, String> {
    let garbage = |why: &str| {
        format!(
            "the answer is not a chat completion with logprobs ({why}): {}",
            clip(body, 200)
        )
    };
    let v: serde_json::Value = serde_json::from_str(body).map_err(|_| garbage("not JSON"))?;
    let first = v.pointer("/choices/0/logprobs/content/0").ok_or_else(|| {
        garbage("no choices[0].logprobs.content[0]; does the server support logprobs?")
    })?;
    let top = first
        .get("top_logprobs")
        .and_then(|t| t.as_array())
        .ok_or_else(|| garbage("no top_logprobs"))?;
    let mut p = [0.0f64; 2];
    let mut seen = [false; 2];
    let mut smallest = f64::INFINITY;
    let mut listed = Vec::new();
    for entry in top {
        let (Some(tok), Some(lp)) = (
            entry.get("token").and_then(|t| t.as_str()),
            entry.get("logprob").and_then(|l| l.as_f64()),
        ) else {
            return Err(garbage("a top_logprobs entry without token and logprob"));
        };
        let prob = lp.exp();
        smallest = smallest.min(prob);
        listed.push(format!("{tok:?}"));
        match tok.trim() {
            "1" => {
                p[0] += prob;
                seen[0] = true;
            }
            "2" => {
                p[1] += prob;
                seen[1] = true;
            }
            _ => {}
        }
    }
    if !seen[0] && !seen[1] {
        return Ok(Answer::Unparsed(listed.join(" ")));
    }
    for i in 0..2 {
        if !seen[i] {
            p[i] = smallest;
        }
    }
    let total = p[0] + p[1];
    if !(total > 0.0 && total.is_finite()) {
        return Err(garbage("log-probs that give no probability"));
    }
    Ok(Answer::Prob(p[0] / total))
}

fn clip(s: &str, n: usize) -> String {
    let s = s.replace('\n', " ");
    if s.chars().count() > n {
        format!("{}…", s.chars().take(n).collect::<String>())
    } else {
        s
    }
}

/// The endpoint with a prompt, as a [`PairwiseJudgeApi`] (for callers that want the trait,
/// such as a both-orders judgement in `rlhf eval`): an unparsed answer counts as ½.
pub struct PromptedEndpoint<'a> {
    /// The client.
    pub judge: &'a EndpointJudge,
    /// What each query says.
    pub prompt: &'a JudgePrompt,
}

impl PairwiseJudgeApi for PromptedEndpoint<'_> {
    fn prob_first_batch(&self, pairs: &[(&str, &str, &str)]) -> Result<Vec<f64>> {
        pairs
            .iter()
            .map(|&(p, a, b)| {
                match self
                    .judge
                    .ask(&self.prompt.render(p, a, b))
                    .map_err(Error::Config)?
                {
                    Answer::Prob(x) => Ok(x),
                    Answer::Unparsed(_) => Ok(0.5),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(entries: &[(&str, f64)]) -> String {
        let top: Vec<serde_json::Value> = entries
            .iter()
            .map(|(t, lp)| serde_json::json!({"token": t, "logprob": lp}))
            .collect();
        serde_json::json!({"choices": [{"logprobs": {"content": [
            {"token": entries[0].0, "logprob": entries[0].1, "top_logprobs": top}
        ]}}]})
        .to_string()
    }

    #[test]
    fn reads_and_normalises_the_two_digits() {
        let b = body(&[
            ("1", (0.6f64).ln()),
            ("2", (0.2f64).ln()),
            ("The", (0.1f64).ln()),
        ]);
        assert_eq!(parse_answer(&b).unwrap(), Answer::Prob(0.75));
        // " 1" and "1" both count for "1".
        let b = body(&[
            (" 2", (0.5f64).ln()),
            ("1", (0.25f64).ln()),
            (" 1", (0.25f64).ln()),
        ]);
        assert_eq!(parse_answer(&b).unwrap(), Answer::Prob(0.5));
        // "2" missing: the smallest listed probability stands in for it.
        let b = body(&[("1", (0.9f64).ln()), ("A", (0.1f64).ln())]);
        let Answer::Prob(p) = parse_answer(&b).unwrap() else {
            panic!()
        };
        assert!((p - 0.9).abs() < 1e-12, "{p}");
        let b = body(&[("Response", -0.1), ("The", -3.0)]);
        assert!(matches!(parse_answer(&b).unwrap(), Answer::Unparsed(s) if s.contains("Response")));
        let err = parse_answer("<html>oops</html>").unwrap_err();
        assert!(err.contains("not JSON") && err.contains("oops"), "{err}");
        let err = parse_answer(r#"{"choices": [{"message": {"content": "1"}}]}"#).unwrap_err();
        assert!(err.contains("logprobs"), "{err}");
    }

    #[test]
    fn refuses_https_and_bare_hosts() {
        let cfg = |url: &str| EndpointConfig {
            url: url.into(),
            model: "m".into(),
            api_key: None,
            top_logprobs: 5,
            timeout: Duration::from_secs(1),
            max_retries: 0,
            backoff: Duration::from_millis(1),
        };
        let e = EndpointJudge::new(cfg("https://api.example.com/v1"))
            .err()
            .unwrap();
        assert!(e.to_string().contains("http:// only"), "{e}");
        assert!(EndpointJudge::new(cfg("localhost:8000")).is_err());
        let j = EndpointJudge::new(cfg("http://127.0.0.1:9/v1/")).unwrap();
        assert_eq!(j.url(), "http://127.0.0.1:9/v1/chat/completions");
    }
}
