//! A small HTTP client for the labelling app's tests: keeps cookies, never follows redirects,
//! reads the CSRF token out of forms. Shared by this crate's tests and `crates/rlhf/tests`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

/// One browser-like session against the app.
pub struct Client {
    agent: ureq::Agent,
    pub base: String,
    pub cookies: BTreeMap<String, String>,
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub location: Option<String>,
    pub set_cookies: Vec<String>,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The value of the first `name="csrf" value="..."` in a page.
pub fn csrf_of(html: &str) -> Option<String> {
    let at = html.find("name=\"csrf\" value=\"")? + "name=\"csrf\" value=\"".len();
    Some(html[at..].split('"').next()?.to_string())
}

impl Client {
    pub fn new(base: &str) -> Client {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .max_redirects(0)
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        Client {
            agent,
            base: base.trim_end_matches('/').to_string(),
            cookies: BTreeMap::new(),
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn read(&mut self, r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Reply {
        self.try_read(r).expect("request")
    }

    fn try_read(
        &mut self,
        r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Reply, ureq::Error> {
        let mut r = r?;
        let headers: Vec<(String, String)> = r
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let set_cookies: Vec<String> = headers
            .iter()
            .filter(|(k, _)| k == "set-cookie")
            .map(|(_, v)| v.clone())
            .collect();
        for c in &set_cookies {
            let first = c.split(';').next().unwrap_or("");
            if let Some((k, v)) = first.split_once('=') {
                if v.is_empty() || c.contains("Max-Age=0") {
                    self.cookies.remove(k);
                } else {
                    self.cookies.insert(k.to_string(), v.to_string());
                }
            }
        }
        let status = r.status().as_u16();
        let location = r
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = r
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_string()?;
        Ok(Reply {
            status,
            location,
            set_cookies,
            headers,
            body,
        })
    }

    /// A GET that returns the transport error instead of panicking (a server going away).
    pub fn try_get(&mut self, path: &str) -> Result<Reply, ureq::Error> {
        let url = format!("{}{path}", self.base);
        let mut req = self.agent.get(&url);
        if !self.cookies.is_empty() {
            req = req.header("Cookie", &self.cookie_header());
        }
        let r = req.call();
        self.try_read(r)
    }

    /// A POST that returns the transport error instead of panicking.
    pub fn try_post(&mut self, path: &str, form: &[(&str, &str)]) -> Result<Reply, ureq::Error> {
        let url = format!("{}{path}", self.base);
        let mut req = self.agent.post(&url);
        if !self.cookies.is_empty() {
            req = req.header("Cookie", &self.cookie_header());
        }
        let r = req.send_form(form.iter().copied());
        self.try_read(r)
    }

    pub fn get(&mut self, path: &str) -> Reply {
        let url = format!("{}{path}", self.base);
        let mut req = self.agent.get(&url);
        if !self.cookies.is_empty() {
            req = req.header("Cookie", &self.cookie_header());
        }
        let r = req.call();
        self.read(r)
    }

    pub fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Reply {
        let url = format!("{}{path}", self.base);
        let mut req = self.agent.post(&url);
        if !self.cookies.is_empty() {
            req = req.header("Cookie", &self.cookie_header());
        }
        let r = req.send_form(form.iter().copied());
        self.read(r)
    }

    pub fn post_raw(&mut self, path: &str, body: Vec<u8>) -> Reply {
        let url = format!("{}{path}", self.base);
        let mut req = self
            .agent
            .post(&url)
            .header("Content-Type", "application/x-www-form-urlencoded");
        if !self.cookies.is_empty() {
            req = req.header("Cookie", &self.cookie_header());
        }
        let r = req.send(&body[..]);
        self.read(r)
    }

    /// Signs in with name and password through the login form; returns the final reply.
    pub fn login(&mut self, name: &str, password: &str) -> Reply {
        let page = self.get("/login");
        let csrf = csrf_of(&page.body).expect("login form has a csrf token");
        self.post(
            "/login",
            &[("csrf", &csrf), ("name", name), ("password", password)],
        )
    }

    /// Signs in with a login token link.
    pub fn login_token(&mut self, token: &str) -> Reply {
        self.get(&format!("/login?token={token}"))
    }

    /// The session's CSRF token (from the home page's sign-out form).
    pub fn csrf(&mut self) -> String {
        let home = self.get("/");
        csrf_of(&home.body).expect("signed-in pages carry the csrf token")
    }
}
