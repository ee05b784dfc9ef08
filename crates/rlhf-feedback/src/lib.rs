//! `rlhf-feedback`: human feedback for RLHF, collected into one SQLite file and exported in
//! the record formats the trainers read.
//!
//! - [`store`]: the database (WAL, migrations): projects, items and their candidate answers,
//!   annotators, sessions, labels (one transaction per submission).
//! - [`label`]: the four task kinds and what a label of each holds (Llama 2's pairwise choice
//!   with degree and safety, a ranking with ties, thumbs up/down with a rewrite, a demonstration).
//! - [`import`] / [`export`]: the project's JSONL, Label Studio's task list and export; export
//!   as `pairs`, `rankings`, `sft`, `kto` or `labelstudio`, per annotator or by majority.
//! - [`agreement`]: Cohen's and Fleiss' kappa, Krippendorff's alpha.
//! - `server` (feature `server`, on by default): the labelling web app (`rlhf feedback serve`).

pub mod agreement;
pub mod error;
pub mod export;
pub mod import;
pub mod label;
#[cfg(feature = "server")]
pub mod server;
pub mod store;
pub mod time;

pub use error::{Error, Result};
pub use label::{Kind, Label};
pub use store::Store;
