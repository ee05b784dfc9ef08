//! `rlhf-data`: reading JSONL/Parquet training files in the record formats of DESIGN.md,
//! validating rows with file:line errors, tokenising, truncating and batching.
