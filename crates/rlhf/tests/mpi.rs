//! Data parallelism over MPI (issue #19), with the `mpi` feature and Open MPI's `mpirun`
//! (scripts/test.sh installs Debian's libopenmpi-dev openmpi-bin libclang-dev).
//!
//! Equivalence: 2 ranks with `per_device_train_batch_size = 2` train as one process with 4,
//! for the reward, SFT and DPO trainers on the tiny llama fixtures: the same logged losses,
//! gradient norms and metrics per step, and the same final weights. The tolerance is what
//! the order of f32 sums allows: the gradient of a batch of 4 is summed inside each matmul,
//! that of 2 × 2 as two partial sums added by the all-reduce; both round differently at about
//! f32's 2⁻²⁴ relative per sum, which after 4 AdamW steps stays below 1e-5 relative (measured
//! up to about 1e-7), so 1e-5 relative plus 1e-6 absolute for the weights. Logged values get
//! 1e-5 absolute instead: PPO's `objective/kl` is a difference of log-probabilities of about
//! 5 in magnitude summed over the response, where f32's rounding of each adds up to about
//! 1e-6 of cancellation per token (measured: 1.7e-6 on −0.041 at step 4).
//!
//! A rank killed mid-run ends the job (mpirun's own message) instead of leaving the other
//! waiting, and `--resume` at the same world size then continues exactly: the same weights
//! as a job that was never killed.
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn shared() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/fixtures"
    ))
}

fn rlhf() -> &'static str {
    env!("CARGO_BIN_EXE_rlhf")
}

/// `mpirun -np n` as root (this machine's tests run as root), ranks beyond the cores allowed,
/// one thread per rank.
fn mpirun(n: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--allow-run-as-root", "--oversubscribe", "-np"])
        .arg(n.to_string())
        .args(["-x", "RAYON_NUM_THREADS=1"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl", "self,vader,tcp")
        .arg(rlhf());
    c
}

/// The fixture's 8 pairs as `kind`'s training rows.
fn data(dir: &Path, kind: &str) -> PathBuf {
    let fx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(shared().join("trl/reward-llama-gqa.json")).unwrap(),
    )
    .unwrap();
    let rows: Vec<String> = fx["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| match kind {
            "sft" => {
                serde_json::json!({"prompt": p["prompt"], "completion": p["chosen"]}).to_string()
            }
            _ => p.to_string(),
        })
        .collect();
    let p = dir.join(format!("{kind}.jsonl"));
    std::fs::write(&p, rows.join("\n") + "\n").unwrap();
    p
}

fn config(dir: &Path, kind: &str, name: &str, batch: usize, extra: &str) -> PathBuf {
    let model = shared().join("models").join(match kind {
        "reward" => "llama-gqa-reward",
        _ => "llama-gqa",
    });
    let train = match kind {
        "ppo" => {
            let p = dir.join("prompts.jsonl");
            let rows: Vec<String> = [
                "The cat",
                "A dog",
                "Once upon",
                "In the",
                "We saw",
                "It was",
            ]
            .iter()
            .cycle()
            .take(12)
            .map(|w| serde_json::json!({ "prompt": w }).to_string())
            .collect();
            std::fs::write(&p, rows.join("\n") + "\n").unwrap();
            p
        }
        _ => data(dir, kind),
    };
    let task = if kind == "reward" {
        "SEQ_CLS"
    } else {
        "CAUSAL_LM"
    };
    let text = format!(
        "model = {model:?}\ntrain_file = {train:?}\noutput_dir = {out:?}\n\
         per_device_train_batch_size = {batch}\nlearning_rate = 1e-3\nlogging_steps = 1\n\
         report_to = [\"jsonl\"]\nmax_length = 64\nseed = 3\n{extra}\n\
         [lora]\nr = 4\nlora_alpha = 8\ntarget_modules = \"all-linear\"\ntask_type = \"{task}\"\n",
        out = dir.join(name),
    );
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn logged(out: &Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| v.as_object().cloned())
        .filter(|m| m.contains_key("step") && m.keys().any(|k| k.starts_with("loss")))
        .collect()
}

fn adapter(out: &Path) -> Vec<(String, Vec<f32>)> {
    let mut t: Vec<(String, Vec<f32>)> = candle_core::safetensors::load(
        out.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap()
    .into_iter()
    .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
    .collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

fn close(what: &str, a: f64, b: f64, abs: f64) {
    assert!(
        (a - b).abs() <= 1e-5 * a.abs().max(b.abs()) + abs,
        "{what}: {a} vs {b}"
    );
}

fn run_ok(mut c: Command, what: &str) {
    let out = c.stderr(Stdio::piped()).output().unwrap();
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn same_job(kind: &str, extra: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let one = config(tmp.path(), kind, "one", 4, extra);
    let two = config(tmp.path(), kind, "two", 2, extra);
    let mut c = Command::new(rlhf());
    c.args([kind, "--config"]).arg(&one);
    run_ok(c, "one process");
    let mut c = mpirun(2);
    c.args([kind, "--config"]).arg(&two);
    run_ok(c, "2 ranks");
    assert_same(kind, tmp.path());
    tmp
}

/// `dir/one` (one process) and `dir/two` (2 ranks) logged the same steps and saved the same
/// weights; rank 0 alone wrote the checkpoint.
fn assert_same(kind: &str, dir: &Path) {
    let (a, b) = (logged(&dir.join("one")), logged(&dir.join("two")));
    assert_eq!(a.len(), 4, "{kind}: logged steps {a:?}");
    assert_eq!(a.len(), b.len(), "{kind}: rank 0 alone logs, once per step");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(
            x.keys().collect::<Vec<_>>(),
            y.keys().collect::<Vec<_>>(),
            "{kind}: logged names"
        );
        for (k, v) in x {
            // Token-weighted means (SFT's and DPO's entropy, mean_token_nll, token accuracy,
            // DPO's mean logits)
            // are each rank's own, averaged over the ranks, as TRL averages what it gathers
            // from its processes: with unequal token counts that is not one process's mean
            // over all tokens. Timings differ by nature.
            // PPO's ratio variance is each rank's, weighted: a variance does not add up.
            if k.contains("runtime")
                || k.contains("per_second")
                || k.starts_with("time/")
                || k == "val/ratio_var"
                || [
                    "entropy",
                    "mean_token_nll",
                    "mean_token_accuracy",
                    "logits/chosen",
                    "logits/rejected",
                ]
                .contains(&k.as_str())
            {
                continue;
            }
            if let (Some(v), Some(w)) = (v.as_f64(), y[k].as_f64()) {
                close(&format!("{kind} step {} {k}", x["step"]), v, w, 1e-5);
            }
        }
    }
    let (wa, wb) = (adapter(&dir.join("one")), adapter(&dir.join("two")));
    assert_eq!(wa.len(), wb.len());
    for ((na, va), (nb, vb)) in wa.iter().zip(&wb) {
        assert_eq!(na, nb);
        for (x, y) in va.iter().zip(vb) {
            close(&format!("{kind} weight {na}"), *x as f64, *y as f64, 1e-6);
        }
    }
    assert!(dir.join("two/checkpoint-2/trainer_state.json").exists());
}

/// Two hosts on this machine: network namespaces joined by a veth pair (10.78.x.1 and
/// 10.78.x.2), each rank started in its own by a `plm_rsh_agent` standing for ssh (`ip netns
/// exec`, with a host name of its own, so that Open MPI sees two nodes and talks TCP between
/// them). Removed on drop.
struct Hosts {
    ns: [String; 2],
    net: String,
    hostfile: PathBuf,
    agent: PathBuf,
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for n in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("iproute2's ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn two_hosts(dir: &Path) -> Hosts {
    let id = std::process::id() % 200 + 20;
    let (a, b) = (format!("rlhf{id}a"), format!("rlhf{id}b"));
    let h = Hosts {
        ns: [a.clone(), b.clone()],
        net: format!("10.78.{id}.0/24"),
        hostfile: dir.join("hostfile"),
        agent: dir.join("agent.sh"),
    };
    let (ipa, ipb) = (format!("10.78.{id}.1"), format!("10.78.{id}.2"));
    let (va, vb) = (format!("{a}v"), format!("{b}v"));
    ip(&["netns", "add", &a]);
    ip(&["netns", "add", &b]);
    ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
    ip(&["link", "set", &va, "netns", &a]);
    ip(&["link", "set", &vb, "netns", &b]);
    for (ns, v, addr) in [(&a, &va, &ipa), (&b, &vb, &ipb)] {
        ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", v]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        ip(&["-n", ns, "link", "set", v, "up"]);
    }
    std::fs::write(&h.hostfile, format!("{ipa} slots=1\n{ipb} slots=1\n")).unwrap();
    let agent = format!(
        "#!/bin/sh\n\
         # ssh's stand-in: agent HOST COMMAND... runs COMMAND in HOST's namespace.\n\
         host=$1; shift\n\
         case $host in\n  {ipa}) ns={a} ;;\n  {ipb}) ns={b} ;;\n  \
         *) echo \"agent: unknown host $host\" >&2; exit 1 ;;\nesac\n\
         exec ip netns exec $ns unshare --uts sh -c \"hostname $ns; $*\"\n"
    );
    std::fs::write(&h.agent, agent).unwrap();
    let mut perm = std::fs::metadata(&h.agent).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(&h.agent, perm).unwrap();
    h
}

/// `mpirun` started on the first host running `command` (a shell command line) as one rank
/// per host, TCP only, pinned to the veth's network (nothing outside the namespaces is
/// addressed).
fn mpirun_across(h: &Hosts, command: &str) -> Command {
    let script = format!(
        "hostname {a} && exec mpirun --allow-run-as-root --hostfile {hf} -np 2 \
         --mca plm_rsh_agent {agent} --mca btl self,tcp --mca btl_tcp_if_include {net} \
         --mca oob_tcp_if_include {net} -x RAYON_NUM_THREADS=1 {command}",
        a = h.ns[0],
        hf = h.hostfile.display(),
        agent = h.agent.display(),
        net = h.net,
    );
    let mut c = Command::new("ip");
    c.args([
        "netns", "exec", &h.ns[0], "unshare", "--uts", "sh", "-c", &script,
    ])
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    c
}

#[test]
fn two_hosts_over_tcp_train_as_one_process_with_the_doubled_batch() {
    // SAFETY: geteuid reads the process's user id.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let hosts = two_hosts(tmp.path());
    // Each rank runs on its own host: its namespace's name and its one 10.78 address.
    let probe = mpirun_across(
        &hosts,
        "sh -c 'echo $(hostname) $(ip -o -4 addr show | grep -c \" 10\\.78\\.\")'",
    )
    .output()
    .unwrap();
    let text = String::from_utf8_lossy(&probe.stdout).to_string();
    let mut seen: Vec<String> = text.lines().map(str::to_string).collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![format!("{} 1", hosts.ns[0]), format!("{} 1", hosts.ns[1])],
        "one rank per host: {}",
        String::from_utf8_lossy(&probe.stderr)
    );

    let extra = "max_steps = 4\nsave_steps = 2";
    let one = config(tmp.path(), "reward", "one", 4, extra);
    let two = config(tmp.path(), "reward", "two", 2, extra);
    let mut c = Command::new(rlhf());
    c.args(["reward", "--config"]).arg(&one);
    run_ok(c, "one process");
    run_ok(
        mpirun_across(
            &hosts,
            &format!("{} reward --config {}", rlhf(), two.display()),
        ),
        "2 hosts",
    );
    assert_same("reward", tmp.path());
}

#[test]
fn two_ranks_train_a_reward_model_as_one_process_with_the_doubled_batch() {
    same_job("reward", "max_steps = 4\nsave_steps = 2");
}

#[test]
fn two_ranks_run_sft_as_one_process_with_the_doubled_batch() {
    // Token-normalised loss: the step's tokens are counted over both ranks.
    same_job("sft", "max_steps = 4\nsave_steps = 2");
}

#[test]
fn two_ranks_run_dpo_as_one_process_with_the_doubled_batch() {
    same_job("dpo", "max_steps = 4\nsave_steps = 2\nbeta = 0.1");
}

#[test]
fn two_ranks_run_ppo_as_one_process_with_the_doubled_batch() {
    // Each rank generates and scores its share of the prompts; the rollout is then
    // gathered, so rewards, whitening, advantages and the KL controller are global, and each
    // rank trains on its share of every global micro-batch, weighted by its tokens.
    // Evaluation is shared out too: the ranks answer and score their shares of the eval
    // prompts, rank 0 writes them all.
    let rm = shared().join("models/llama-gqa-reward");
    let tmp = same_job(
        "ppo",
        &format!(
            "max_steps = 4\nsave_steps = 2\nreward_model = {rm:?}\nnum_generations = 2\n\
             response_length = 6\ntemperature = 1.0\nnum_ppo_epochs = 2\nnum_mini_batches = 1\n\
             local_rollout_forward_batch_size = 2\nkl_coef = 0.05\nadap_kl_ctrl = true\n\
             whiten_rewards = true\neval_file = \"prompts.jsonl\"\neval_prompts = 5\n\
             eval_strategy = \"steps\"\neval_steps = 2"
        ),
    );
    for step in [2, 4] {
        let read = |run: &str| -> Vec<serde_json::Value> {
            std::fs::read_to_string(tmp.path().join(format!("{run}/eval_step{step}.jsonl")))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        };
        let (a, b) = (read("one"), read("two"));
        assert_eq!(a.len(), 5);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x["completion"], y["completion"], "step {step}");
            close(
                &format!("eval score at step {step}"),
                x["score"].as_f64().unwrap(),
                y["score"].as_f64().unwrap(),
                1e-5,
            );
        }
    }
}

#[test]
fn gradient_accumulation_and_an_uneven_last_batch_over_two_ranks() {
    // 8 pairs, global batch 2 × 3 = 6: the epoch's last batch of 2 is filled to 6 from its own
    // pairs (accelerate's even_batches), so only the all-equal case is compared with one
    // process; here the job must run, log once per step and stay finite.
    let tmp = tempfile::tempdir().unwrap();
    let two = config(
        tmp.path(),
        "reward",
        "two",
        3,
        "max_steps = 4\ngradient_accumulation_steps = 2\nsave_steps = 0",
    );
    let mut c = mpirun(2);
    c.args(["reward", "--config"]).arg(&two);
    run_ok(c, "2 ranks");
    let b = logged(&tmp.path().join("two"));
    assert_eq!(b.len(), 4);
    assert!(b.iter().all(|m| m["loss"].as_f64().unwrap().is_finite()));
}

/// The pid of the rank `rank` process of the job writing `out` (its environment names the rank,
/// its command line the config).
fn rank_pid(config: &Path, rank: usize) -> Option<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmd).contains(&*config.to_string_lossy()) {
            continue;
        }
        let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
        if env.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

#[test]
fn a_killed_rank_ends_the_job_and_resume_continues_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = "max_steps = 300\nsave_steps = 20";
    let whole = config(tmp.path(), "reward", "whole", 2, extra);
    let mut c = mpirun(2);
    c.args(["reward", "--config"]).arg(&whole);
    run_ok(c, "uninterrupted");

    let cut = config(tmp.path(), "reward", "cut", 2, extra);
    let mut c = mpirun(2);
    c.args(["reward", "--config"])
        .arg(&cut)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let child = c.spawn().unwrap();
    // Kill rank 1 once the first checkpoint is there.
    let started = Instant::now();
    let ckpt = tmp.path().join("cut/checkpoint-20");
    while !ckpt.exists() {
        assert!(started.elapsed() < Duration::from_secs(60), "no checkpoint");
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = rank_pid(&cut, 1).expect("rank 1 is running");
    let pid0 = rank_pid(&cut, 0).expect("rank 0 is running");
    // SAFETY: a signal to a process of this test's own job.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let out = child.wait_with_output().unwrap();
    let waited = started.elapsed();
    assert!(!out.status.success(), "the job went on without a rank");
    assert!(
        waited < Duration::from_secs(60),
        "the job hung for {waited:?}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("signal 9") || err.contains("Killed") || err.contains("exited"),
        "no clear message: {err}"
    );
    // The surviving rank goes too (mpirun ends it), within the same bound.
    let gone = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
    };
    while !gone(pid0) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "rank 0 outlived the job"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut c = mpirun(2);
    c.args(["reward", "--config"]).arg(&cut).arg("--resume");
    run_ok(c, "resumed");
    let (wa, wb) = (
        adapter(&tmp.path().join("whole")),
        adapter(&tmp.path().join("cut")),
    );
    assert_eq!(
        wa, wb,
        "resumed weights differ from the uninterrupted job's"
    );

    // One process may not resume a checkpoint of 2 ranks.
    let mut c = Command::new(rlhf());
    c.args(["reward", "--config"]).arg(&cut).arg("--resume");
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("same world size"),
        "{err}"
    );
}
