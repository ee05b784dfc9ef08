//! HIR on the tiny fixture Llama: the objective's loss is the SFT loss plus α × the contrastive
//! term (and minus the entropy bonus) computed directly from the model's log-probs; two rounds
//! scored by the fixture reward model write their samples, relabellings, policies and metrics,
//! and a run killed mid-sampling resumes to the same files and weights; bad rules are refused
//! naming the file and the key; a pipeline takes an `[hir]` stage.

mod common;

use common::shared;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use rlhf_model::{Heads, LoadOptions, Model};
use rlhf_train::hir::{self, HirConfig, HirGroup, HirItem, HirObjective};
use rlhf_train::losses::{hir_contrastive_loss, mean_token_entropy};
use rlhf_train::reference::{sequence_logps, Seq};
use rlhf_train::sampling::{sft_example, Sample};
use rlhf_train::sft::SftObjective;
use rlhf_train::trainer::{Objective, StepScale};

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn item(instruction: &[u32], output: &[u32]) -> HirItem {
    HirItem {
        instruction: instruction.to_vec(),
        output: output.to_vec(),
    }
}

/// Σ log P(output | instruction) and the states that predicted its tokens, one sequence alone.
fn logp_alone(model: &Model, instruction: &[u32], output: &[u32]) -> (f64, Tensor) {
    let seq = Seq::fit(
        instruction,
        output,
        1024,
        rlhf_data::TruncationMode::KeepStart,
    );
    let (lp, states) = sequence_logps(model, &[seq], 0).unwrap();
    (
        lp.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()[0],
        states,
    )
}

#[test]
fn the_objective_is_sft_plus_alpha_contrastive_minus_the_entropy_bonus() {
    let model = Model::load(
        &shared().join("models/llama-gqa"),
        &LoadOptions {
            heads: Heads::Lm,
            ..Default::default()
        },
    )
    .unwrap();
    let (plain_a, bad_a, plain_b) = (
        vec![1u32, 20, 21, 22],
        vec![1u32, 9, 20, 21, 22],
        vec![1u32, 40, 41],
    );
    // Prompt A: one output kept its instruction, one was relabelled; prompt B: one output.
    let groups = [
        HirGroup {
            items: vec![item(&plain_a, &[50, 51, 52, 2]), item(&bad_a, &[60, 61])],
        },
        HirGroup {
            items: vec![item(&plain_b, &[70, 71, 72, 73, 74])],
        },
    ];
    let alpha = 0.7;
    let objective = |entropy_weight: f64| HirObjective {
        pad_id: 0,
        max_length: 1024,
        contrastive_weight: alpha,
        entropy_weight,
    };
    let hir0 = objective(0.0);
    let step_items: usize = groups.iter().map(|g| hir0.items(g)).sum();
    assert_eq!(step_items, 4 + 2 + 5, "items are the output tokens");
    let scale = StepScale {
        micro_batches: 1,
        step_items,
    };
    let refs: Vec<&HirGroup> = groups.iter().collect();
    let got = scalar(&hir0.loss(&model, &refs, scale).unwrap().loss);

    // SFT's loss on the same (instruction, output) rows, as rejection sampling builds them.
    let sft_rows: Vec<_> = groups
        .iter()
        .flat_map(|g| &g.items)
        .map(|it| {
            let s = Sample {
                prompt_index: 0,
                sample_index: 0,
                round: 1,
                prompt: serde_json::Value::Null,
                completion: String::new(),
                completion_ids: it.output.clone(),
                finished: true,
                score: 0.0,
                scores: BTreeMap::new(),
            };
            sft_example(&it.instruction, &s, 1024)
        })
        .collect();
    let sft_refs: Vec<_> = sft_rows.iter().collect();
    let sft = scalar(
        &SftObjective { pad_id: 0 }
            .loss(&model, &sft_refs, scale)
            .unwrap()
            .loss,
    );

    // s_ij = log P(o_i | instruction_j) / |o_i| over the batch's three distinct instructions,
    // each sequence scored alone; output i's own instruction is column i.
    let instructions = [&plain_a, &bad_a, &plain_b];
    let outputs: Vec<&[u32]> = groups
        .iter()
        .flat_map(|g| &g.items)
        .map(|it| it.output.as_slice())
        .collect();
    let s: Vec<Vec<f64>> = outputs
        .iter()
        .map(|o| {
            instructions
                .iter()
                .map(|ins| logp_alone(&model, ins, o).0 / o.len() as f64)
                .collect()
        })
        .collect();
    let matrix = |rows: &[Vec<f64>], cols: usize| {
        let flat: Vec<f64> = rows.iter().flat_map(|r| r[..cols].to_vec()).collect();
        Tensor::from_vec(flat, (rows.len(), cols), &candle_core::Device::Cpu).unwrap()
    };
    let contrastive = scalar(&hir_contrastive_loss(&matrix(&s, 3), &[0, 1, 2]).unwrap());
    assert!(contrastive > 0.0);
    let want = sft + alpha * contrastive;
    assert!(
        (got - want).abs() < 1e-4 * want.abs().max(1.0),
        "HIR loss {got} vs SFT {sft} + {alpha} × contrastive {contrastive} = {want}"
    );

    // The entropy bonus: the mean entropy of the next-token distributions over the outputs'
    // tokens under their own instructions, subtracted with its weight.
    let states: Vec<Tensor> = outputs
        .iter()
        .zip(instructions)
        .map(|(o, ins)| logp_alone(&model, ins, o).1)
        .collect();
    let logits = model.logits(&Tensor::cat(&states, 0).unwrap()).unwrap();
    let h = scalar(&mean_token_entropy(&logits.to_dtype(DType::F32).unwrap()).unwrap());
    assert!(h > 0.0);
    let with_entropy = scalar(&objective(0.05).loss(&model, &refs, scale).unwrap().loss);
    assert!(
        (with_entropy - (want - 0.05 * h)).abs() < 1e-4,
        "{with_entropy} vs {want} − 0.05 × {h}"
    );

    // Two micro-batches: the SFT part over the step's tokens, the contrastive part (over the
    // micro-batch's own two instructions) halved.
    let half = StepScale {
        micro_batches: 2,
        step_items,
    };
    let first = scalar(&hir0.loss(&model, &refs[..1], half).unwrap().loss);
    let sft_a = scalar(
        &SftObjective { pad_id: 0 }
            .loss(&model, &sft_refs[..2], half)
            .unwrap()
            .loss,
    );
    let contrastive_a = scalar(&hir_contrastive_loss(&matrix(&s[..2], 2), &[0, 1]).unwrap());
    let want = sft_a + alpha * contrastive_a / 2.0;
    assert!((first - want).abs() < 1e-4, "{first} vs {want}");
}

fn prompts_file(dir: &Path) -> PathBuf {
    let words = [
        "The cat",
        "A dog",
        "Once upon",
        "In the",
        "We saw",
        "She said",
        "It was",
    ];
    let rows: Vec<String> = words
        .iter()
        .map(|w| serde_json::json!({"prompt": w}).to_string())
        .collect();
    let p = dir.join("prompts.jsonl");
    std::fs::write(&p, rows.join("\n") + "\n").unwrap();
    p
}

fn config(dir: &Path, out: &str, extra: &str) -> PathBuf {
    let model = shared().join("models/llama-gqa");
    let rm = shared().join("models/llama-gqa-reward");
    let prompts = prompts_file(dir);
    let text = format!(
        "model = {model:?}\ntrain_file = {prompts:?}\noutput_dir = {out:?}\n\
         reward_model = {rm:?}\nnum_samples = 4\nmax_new_tokens = 6\n\
         generation_batch_size = 8\nper_device_train_batch_size = 2\n\
         learning_rate = 1e-2\nlr_scheduler_type = \"constant\"\nmax_steps = 4\n\
         save_steps = 2\nlogging_steps = 1\nseed = 5\nreport_to = [\"jsonl\"]\n{extra}\n\
         [[relabel]]\nmin_score = 0.5\ninstruction = \"{{prompt}}\"\n\
         [[relabel]]\ninstruction = \"Badly: {{prompt}}\"\n\
         [lora]\nr = 8\nlora_alpha = 16\ntarget_modules = \"all-linear\"\ntask_type = \"CAUSAL_LM\"\n",
        out = dir.join(out)
    );
    let p = dir.join(format!("{out}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn jsonl(path: &Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn f(m: &serde_json::Map<String, serde_json::Value>, k: &str) -> f64 {
    m.get(k)
        .and_then(|v| v.as_f64())
        .unwrap_or_else(|| panic!("no {k} in {m:?}"))
}

#[test]
fn two_rounds_write_their_files_and_a_killed_run_resumes_to_the_same_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = "iterations = 2\nthreshold_type = \"quantile\"\ncontrastive_weight = 0.5\n\
                 temperature = [1.0, 0.8]";
    let whole = config(tmp.path(), "whole", extra);
    let summary = hir::run(&whole, &[], None).unwrap();
    assert_eq!(summary["iterations"], 2.0);
    let out = tmp.path().join("whole");

    let m = jsonl(&out.join("metrics.jsonl"));
    let rounds: Vec<_> = m
        .iter()
        .filter(|r| r.contains_key("hir/relabelled_fraction"))
        .collect();
    assert_eq!(rounds.len(), 3, "two rounds and the summary: {m:?}");
    for (i, r) in rounds[..2].iter().enumerate() {
        let dir = out.join(format!("iteration-{}", i + 1));
        let samples = jsonl(&dir.join("samples.jsonl"));
        let relabelled = jsonl(&dir.join("relabelled.jsonl"));
        assert_eq!(samples.len(), 28, "7 prompts × 4");
        let round: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(dir.join("round.json")).unwrap())
                .unwrap();
        let mut line = (*r).clone();
        assert_eq!(
            line.remove("step").and_then(|v| v.as_f64()),
            Some(i as f64 + 1.0)
        );
        assert_eq!(round, line, "round.json is the round's metrics line");
        // The median of the round's scores splits them: rule 1 keeps the prompt at or above
        // it, rule 2 prefixes "Badly: " below it.
        let tau = f(r, "hir/threshold1");
        let scores: Vec<f64> = samples.iter().map(|s| f(s, "score")).collect();
        let mut sorted = scores.clone();
        sorted.sort_by(f64::total_cmp);
        assert!(
            (tau - (sorted[13] + sorted[14]) / 2.0).abs() < 1e-5,
            "{tau}"
        );
        let kept: Vec<_> = relabelled
            .iter()
            .filter(|s| !s["completion_ids"].as_array().unwrap().is_empty())
            .collect();
        assert_eq!(kept.len(), relabelled.len());
        for s in &relabelled {
            let prompt = s["prompt"].as_str().unwrap();
            let ins = s["instruction"].as_str().unwrap();
            if f(s, "score") >= tau {
                assert_eq!((f(s, "rule"), ins), (1.0, prompt));
            } else {
                assert_eq!(f(s, "rule"), 2.0);
                assert_eq!(ins, format!("Badly: {prompt}"));
            }
        }
        let below = scores.iter().filter(|&&x| x < tau).count() as f64 / 28.0;
        assert!((f(r, "hir/relabelled_fraction") - below).abs() < 1e-12);
        assert!((f(r, "hir/rule1_fraction") + f(r, "hir/rule2_fraction") - 1.0).abs() < 1e-12);
        assert!(f(r, "hir/rule1_mean_reward") >= f(r, "hir/rule2_mean_reward"));
        assert_eq!(f(r, "hir/dropped_fraction"), 0.0);
        for k in ["hir/sft_loss", "hir/contrastive_loss", "hir/train_loss"] {
            assert!(f(r, k).is_finite() && f(r, k) > 0.0, "{k}: {r:?}");
        }
        // The round's own training log carries the loss's parts each logging window.
        let log = jsonl(&dir.join("metrics.jsonl"));
        let steps: Vec<_> = log.iter().filter(|l| l.contains_key("loss")).collect();
        assert_eq!(steps.len(), 4, "{log:?}");
        for l in &steps {
            let want = f(l, "sft_loss") + 0.5 * f(l, "contrastive_loss");
            assert!((f(l, "loss") - want).abs() < 1e-4, "{l:?}");
        }
        // Two prompts a micro-batch, each with one or two instructions (the epoch's last
        // micro-batch may hold one prompt).
        assert!(steps.iter().any(|l| f(l, "candidates") >= 3.0), "{steps:?}");
        assert!(dir.join("adapter_model.safetensors").exists());
    }
    assert!(out.join("adapter_model.safetensors").exists());

    // Killed after the first batch of round 1, the next batch torn mid-line.
    let cut = config(tmp.path(), "cut", extra);
    let mut cfg = HirConfig::load(&cut, &[]).unwrap();
    cfg.stop_after_batches = Some(1);
    assert!(hir::run_config(cfg.clone(), false).is_err());
    let r1 = tmp.path().join("cut/iteration-1/samples.jsonl");
    let mut text = std::fs::read_to_string(&r1).unwrap();
    assert_eq!(text.lines().count(), 8);
    text.push_str(r#"{"prompt_index":2,"sample_index":0,"round":1,"prompt":"Once up"#);
    std::fs::write(&r1, text).unwrap();
    cfg.stop_after_batches = None;
    let err = hir::run_config(cfg.clone(), false).unwrap_err();
    assert!(err.to_string().contains("--resume"), "{err}");
    hir::run_config(cfg, true).unwrap();
    for i in 1..=2 {
        for file in ["samples.jsonl", "relabelled.jsonl", "round.json"] {
            let a = std::fs::read_to_string(tmp.path().join(format!("whole/iteration-{i}/{file}")));
            let b = std::fs::read_to_string(tmp.path().join(format!("cut/iteration-{i}/{file}")));
            if file == "round.json" {
                // Training time differs; everything else is the same.
                let strip = |t: String| {
                    let mut v: serde_json::Map<String, serde_json::Value> =
                        serde_json::from_str(&t).unwrap();
                    v.remove("hir/train_runtime");
                    v
                };
                assert_eq!(strip(a.unwrap()), strip(b.unwrap()), "iteration-{i}/{file}");
            } else {
                assert_eq!(a.unwrap(), b.unwrap(), "iteration-{i}/{file}");
            }
        }
    }
    let w = |d: &str| std::fs::read(tmp.path().join(d).join("adapter_model.safetensors")).unwrap();
    assert_eq!(w("whole/iteration-1"), w("cut/iteration-1"));
    assert_eq!(w("whole"), w("cut"), "final adapters differ");
}

#[test]
fn bad_rules_in_a_config_file_are_refused_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let base = config(tmp.path(), "x", "");
    let text = std::fs::read_to_string(&base).unwrap();
    let write = |name: &str, t: String| {
        let p = tmp.path().join(name);
        std::fs::write(&p, t).unwrap();
        p
    };
    // Thresholds out of order.
    let p = write(
        "order.toml",
        text.replace(
            "[[relabel]]\ninstruction = \"Badly",
            "[[relabel]]\nmin_score = 0.9\ninstruction = \"Meh: {prompt}\"\n\
             [[relabel]]\ninstruction = \"Badly",
        ),
    );
    let e = HirConfig::load(&p, &[]).unwrap_err().to_string();
    assert!(
        e.contains("order.toml: \"relabel[2].min_score\" must be below relabel[1].min_score"),
        "{e}"
    );
    // A template without the placeholder.
    let p = write(
        "placeholder.toml",
        text.replace("\"Badly: {prompt}\"", "\"Badly.\""),
    );
    let e = HirConfig::load(&p, &[]).unwrap_err().to_string();
    assert!(
        e.contains(
            "placeholder.toml: \"relabel[2].instruction\" must be a template holding {prompt}"
        ),
        "{e}"
    );
    // A misspelt key inside a rule, and a misspelt top-level key.
    let p = write(
        "typo.toml",
        text.replace("min_score = 0.5", "min_scor = 0.5"),
    );
    let e = HirConfig::load(&p, &[]).unwrap_err().to_string();
    assert!(e.contains("typo.toml") && e.contains("min_scor"), "{e}");
    let p = write(
        "top.toml",
        text.replace("seed = 5", "seed = 5\ncontrastive_wieght = 1.0"),
    );
    let e = HirConfig::load(&p, &[]).unwrap_err().to_string();
    assert!(e.contains("did you mean `contrastive_weight`?"), "{e}");
    // Thresholds per prompt; an unknown kind names the file.
    let c = HirConfig::load(&base, &["threshold_type=prompt_quantile".into()]).unwrap();
    assert_eq!(c.hir.threshold_type, "prompt_quantile");
    let e = HirConfig::load(&base, &["threshold_type=median".into()])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("x.toml: \"threshold_type\" must be \"value\", \"quantile\" or"),
        "{e}"
    );
    // `--set` reaches HIR's keys.
    let c = HirConfig::load(&base, &["contrastive_weight=0.25".into()]).unwrap();
    assert_eq!(c.hir.contrastive_weight, 0.25);
    assert_eq!(c.hir.relabel.len(), 2);
}

#[test]
fn a_pipeline_takes_an_hir_stage_scored_by_the_last_reward_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("pipeline.toml");
    std::fs::write(
        &p,
        "model = \"m\"\noutput_dir = \"out\"\n\
         [sft]\ntrain_file = \"sft.jsonl\"\n\
         [reward]\ntrain_file = \"prefs.jsonl\"\n\
         [hir]\ntrain_file = \"prompts.jsonl\"\niterations = 2\n\
         [[hir.relabel]]\nmin_score = 0.0\ninstruction = \"{prompt}\"\n\
         [[hir.relabel]]\ninstruction = \"Badly: {prompt}\"\n",
    )
    .unwrap();
    let st = rlhf_train::pipeline::stage_tables(&p, &[]).unwrap();
    assert_eq!(st.kinds, vec!["sft", "reward", "hir"]);
    let (_, hir) = &st.stages[2];
    let get = |k: &str| hir[k].as_str().unwrap().to_string();
    assert_eq!(get("model"), st.output_of("sft").unwrap().to_string_lossy());
    assert_eq!(
        get("reward_model"),
        st.output_of("reward").unwrap().to_string_lossy()
    );
    // The stage's table is a whole HIR config.
    let cfg = tmp.path().join("hir.toml");
    std::fs::write(&cfg, toml::to_string(hir).unwrap()).unwrap();
    let c = HirConfig::load(&cfg, &[]).unwrap();
    assert_eq!((c.hir.iterations, c.hir.relabel.len()), (2, 2));
}
