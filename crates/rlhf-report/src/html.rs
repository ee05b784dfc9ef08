//! The page: escaped text, PNGs inlined as data URIs, inline CSS and one inline script, so
//! `report.html` opens from disk alone and asks the network for nothing.

use std::fmt::Write as _;
use std::path::Path;

use base64::Engine as _;

use crate::{data, Error, Result};

/// Text for HTML: element content and quoted attribute values alike.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// At most `max` characters of `s`, marked where cut (answers can run to pages).
pub fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}… [{} more characters]", &s[..i], s[i..].chars().count()),
        None => s.to_string(),
    }
}

/// A number for a table cell: `–` where absent.
pub fn num(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |v| format!("{v:.digits$}"))
}

/// A fraction in [0, 1] as a percentage, AlpacaEval's way of showing win rates.
pub fn pct(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{:.1}%", v * 100.0))
}

const CSS: &str = r#"
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       margin: 0 auto; max-width: 1260px; padding: 16px 20px 48px; color: #1d1d1f;
       line-height: 1.45; background: #fff; }
h1 { font-size: 1.6em; margin: 0.4em 0 0.1em; }
h2 { font-size: 1.3em; margin-top: 1.8em; padding-bottom: 0.2em; border-bottom: 2px solid #e4e4e4; }
h3 { font-size: 1.05em; margin: 1.2em 0 0.4em; }
nav a { margin-right: 1em; color: #1f77b4; text-decoration: none; }
code, pre { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 0.88em; }
.muted { color: #666; }
.note { background: #fff8e5; border-left: 4px solid #f0b400; padding: 6px 10px; margin: 8px 0; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
figure { margin: 0; border: 1px solid #e4e4e4; border-radius: 4px; padding: 4px; background: #fff; }
figure img { display: block; max-width: 100%; height: auto; }
figcaption { font-size: 0.8em; color: #666; text-align: center; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: right; vertical-align: top; }
th { background: #f5f5f7; }
td:first-child, th:first-child { text-align: left; }
table.kv td { text-align: left; }
.pair { border: 1px solid #ddd; border-radius: 4px; margin: 12px 0; padding: 8px 10px; }
.pair .cols { display: grid; grid-template-columns: 1fr 1fr; gap: 10px; }
.pair pre { white-space: pre-wrap; word-break: break-word; margin: 4px 0; padding: 6px 8px;
            background: #f7f7f9; border-radius: 3px; max-height: 22em; overflow: auto; }
.label { font-weight: 600; font-size: 0.85em; }
.chip { display: inline-block; font-size: 0.8em; padding: 0 6px; margin: 0 4px 2px 0;
        border-radius: 8px; background: #eee; }
.v-policy { background: #fde6cf; } .v-baseline { background: #d6e8f5; } .v-tie { background: #eee; }
"#;

/// Reports how many `<img>` decoded as `data-plots="loaded/total"` on `<body>`, so a browser
/// test (or a person in the dev tools) sees a broken plot without looking at every one.
const SCRIPT: &str = r#"
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.dataset.plots = ok + "/" + imgs.length;
});
"#;

/// The page being built, section by section.
pub struct Page {
    title: String,
    body: String,
    images: usize,
}

impl Page {
    /// An empty page titled `title`.
    pub fn new(title: &str) -> Self {
        Self {
            title: title.to_string(),
            body: String::new(),
            images: 0,
        }
    }

    /// Raw HTML, already escaped by the caller.
    pub fn raw(&mut self, html: &str) {
        self.body.push_str(html);
    }

    /// A section heading with an anchor for the navigation bar.
    pub fn section(&mut self, id: &str, title: &str) {
        let _ = writeln!(self.body, "<h2 id=\"{}\">{}</h2>", esc(id), esc(title));
    }

    /// A sub-heading.
    pub fn h3(&mut self, title: &str) {
        let _ = writeln!(self.body, "<h3>{}</h3>", esc(title));
    }

    /// A highlighted note: what is missing and how to get it.
    pub fn note(&mut self, text: &str) {
        let _ = writeln!(self.body, "<p class=\"note\">{}</p>", esc(text));
    }

    /// Opens a row of figures.
    pub fn grid_start(&mut self) {
        self.body.push_str("<div class=\"grid\">\n");
    }

    /// Closes a row of figures.
    pub fn grid_end(&mut self) {
        self.body.push_str("</div>\n");
    }

    /// The PNG at `png` inlined as a data URI, captioned with its file name (which sits
    /// beside report.html too).
    pub fn figure(&mut self, png: &Path, alt: &str, size: (u32, u32)) -> Result<()> {
        let bytes = std::fs::read(png).map_err(|source| Error::Io {
            path: png.to_path_buf(),
            source,
        })?;
        let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
        let name = png.file_name().unwrap_or_default().to_string_lossy();
        let _ = writeln!(
            self.body,
            "<figure><img src=\"data:image/png;base64,{b64}\" alt=\"{}\" width=\"{}\" height=\"{}\">\
             <figcaption>{}</figcaption></figure>",
            esc(alt),
            size.0,
            size.1,
            esc(&name)
        );
        self.images += 1;
        Ok(())
    }

    /// How many plots the page holds.
    pub fn images(&self) -> usize {
        self.images
    }

    /// The whole document.
    pub fn finish(self, nav: &[(&str, &str)]) -> String {
        let links: String = nav
            .iter()
            .map(|(id, t)| format!("<a href=\"#{}\">{}</a>", esc(id), esc(t)))
            .collect();
        format!(
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
             <title>{title}</title>\n<style>{CSS}</style>\n</head>\n<body>\n\
             <h1>{title}</h1>\n<nav>{links}</nav>\n{body}\n<script>{SCRIPT}</script>\n\
             </body>\n</html>\n",
            title = esc(&self.title),
            body = self.body,
        )
    }
}

/// One prompt's two answers for the side-by-side view.
pub struct Pair<'a> {
    /// The prompt both answered.
    pub prompt: &'a str,
    /// `(label, answer, scores line)` for the left (baseline / earlier) column.
    pub left: (&'a str, &'a str, String),
    /// The same for the right (policy / later) column.
    pub right: (&'a str, &'a str, String),
    /// `(judge, verdict)`: "policy" | "baseline" | "tie".
    pub verdicts: &'a [(String, String)],
}

/// Longest answer shown in full; the rest is cut with a count.
const MAX_CHARS: usize = 3000;

/// Answers side by side, one box per prompt.
pub fn pairs(page: &mut Page, pairs: &[Pair<'_>]) {
    let mut h = String::new();
    for p in pairs {
        let _ = write!(
            h,
            "<div class=\"pair\"><div class=\"label\">prompt</div><pre>{}</pre><div class=\"cols\">",
            esc(&clip(p.prompt, MAX_CHARS))
        );
        for (label, text, scores) in [&p.left, &p.right] {
            let _ = write!(
                h,
                "<div><span class=\"label\">{}</span> <span class=\"muted\">{}</span><pre>{}</pre></div>",
                esc(label),
                esc(scores),
                esc(&clip(text, MAX_CHARS))
            );
        }
        h.push_str("</div>");
        if !p.verdicts.is_empty() {
            h.push_str("<div><span class=\"label\">verdicts</span> ");
            for (judge, v) in p.verdicts {
                let class = match v.as_str() {
                    "policy" | "baseline" | "tie" => v.as_str(),
                    _ => "tie",
                };
                let _ = write!(
                    h,
                    "<span class=\"chip v-{class}\">{}: {}</span>",
                    esc(judge),
                    esc(v)
                );
            }
            h.push_str("</div>");
        }
        h.push_str("</div>\n");
    }
    page.raw(&h);
}

/// The eval table: one line per judge, AlpacaEval's columns, Llama 2's win rate and, for
/// scorers, the mean and median scores of both sides.
pub fn judges_table(page: &mut Page, judges: &[data::Judge]) {
    // (header, key in eval.json, shown as a percentage?)
    const COLS: [(&str, &str, Fmt); 14] = [
        ("win rate", "win_rate", Fmt::Pct),
        ("SE", "standard_error", Fmt::Pct),
        ("LC win rate", "length_controlled_winrate", Fmt::Pct),
        ("Llama 2 win rate", "llama2_win_rate", Fmt::Pct),
        ("wins", "n_wins", Fmt::Int),
        ("losses", "n_wins_base", Fmt::Int),
        ("draws", "n_draws", Fmt::Int),
        ("n", "n_total", Fmt::Int),
        ("avg length", "avg_length", Fmt::Num(1)),
        ("policy mean", "policy_mean", Fmt::Num(3)),
        ("baseline mean", "baseline_mean", Fmt::Num(3)),
        ("policy median", "policy_median", Fmt::Num(3)),
        ("baseline median", "baseline_median", Fmt::Num(3)),
        ("kind", "kind", Fmt::Text),
    ];
    let mut h = String::from("<table class=\"judges\"><tr><th>judge</th>");
    for (head, key, _) in COLS {
        let _ = write!(h, "<th title=\"{key}\">{head}</th>");
    }
    h.push_str("</tr>\n");
    for j in judges {
        let _ = write!(h, "<tr><td>{}</td>", esc(&j.name));
        for (_, key, fmt) in COLS {
            let cell = match fmt {
                Fmt::Pct => pct(j.num(key)),
                Fmt::Int => num(j.num(key), 0),
                Fmt::Num(d) => num(j.num(key), d),
                Fmt::Text => j
                    .fields
                    .get(key)
                    .and_then(|v| v.as_str())
                    .unwrap_or("–")
                    .to_string(),
            };
            let _ = write!(h, "<td>{}</td>", esc(&cell));
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</table>\n");
    page.raw(&h);
}

#[derive(Clone, Copy)]
enum Fmt {
    Pct,
    Int,
    Num(usize),
    Text,
}

/// A two-column key/value table (run summaries, eval metadata).
pub fn kv_table(page: &mut Page, rows: &[(String, String)]) {
    let mut h = String::from("<table class=\"kv\">");
    for (k, v) in rows {
        let _ = write!(h, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(v));
    }
    h.push_str("</table>\n");
    page.raw(&h);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            esc("<script>alert('x') && \"y\"</script>"),
            "&lt;script&gt;alert(&#39;x&#39;) &amp;&amp; &quot;y&quot;&lt;/script&gt;"
        );
    }

    #[test]
    fn clip_counts_what_it_cuts() {
        assert_eq!(clip("héllo", 10), "héllo");
        assert_eq!(clip("héllo", 2), "hé… [3 more characters]");
    }
}
