//! One module per subcommand.

pub mod ai_feedback;
pub mod bench;
pub mod convert;
pub mod eval;
pub mod feedback;
pub mod generate;
pub mod report;
pub mod score;
pub mod serve;
pub mod train;

use std::path::Path;

use anyhow::Result;
use rlhf_model::tokenizer::Tokenizer;

/// A progress bar on stderr, hidden when stderr is not a terminal.
pub fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// The tokenizer of a model directory, with the adapter directory's taking precedence (PEFT
/// saves the tokenizer beside the adapter when it was changed).
pub fn load_tokenizer(model: &Path, adapter: Option<&Path>) -> Result<Tokenizer> {
    if let Some(a) = adapter {
        if a.join("tokenizer.json").exists() {
            return Ok(Tokenizer::from_dir(a)?);
        }
    }
    Ok(Tokenizer::from_dir(model)?)
}
