//! Data parallelism across processes: the collective operations the trainers need, behind one
//! trait, so that a trainer does not know which engine runs them.
//!
//! A job of N ranks (`mpirun -np N rlhf reward --config ...`, with the `mpi` feature) runs the
//! same program in every rank, in lockstep: the same seeds, the same data order. Each rank
//! takes its share of every global batch (`per_device_train_batch_size` examples, as
//! accelerate counts a device's batch), gradients are summed over the ranks by an all-reduce
//! before clipping, so every rank applies the same update to the same weights. Rank 0 alone
//! writes: logs, metrics, checkpoints and the final model.
//!
//! Backends: [`Single`] (one process, every operation the identity); with the `mpi`
//! feature, [`mpi::Mpi`] over Open MPI (the `mpi` crate); with the `nccl` feature,
//! [`nccl::Nccl`], NCCL on one GPU per rank, bootstrapped over MPI. The process's world is
//! installed once by the binary ([`install`]) and read with [`world`]; it lives on the main
//! thread, as MPI's single-threaded mode requires (candle's worker threads never call it).

use std::cell::RefCell;
use std::rc::Rc;

/// The collective operations of a data-parallel job.
pub trait Collective {
    /// This process's rank, 0-based.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// Sums `buf` element-wise over the ranks, in place; every rank gets the sum.
    fn all_reduce_sum_f32(&self, buf: &mut [f32]);
    /// [`Self::all_reduce_sum_f32`] for f64 (losses and metrics).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]);
    /// The element-wise maximum over the ranks, in place.
    fn all_reduce_max_f64(&self, buf: &mut [f64]);
    /// Waits until every rank has reached this point.
    fn barrier(&self);
    /// Ends the whole job (every rank) with `code`: an error on one rank must not leave the
    /// others waiting in a collective.
    fn abort(&self, code: i32) -> !;
    /// The engine's name, for the log.
    fn name(&self) -> &'static str;
}

/// One process: the identity collective.
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum_f32(&self, _: &mut [f32]) {}
    fn all_reduce_sum_f64(&self, _: &mut [f64]) {}
    fn all_reduce_max_f64(&self, _: &mut [f64]) {}
    fn barrier(&self) {}
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
    fn name(&self) -> &'static str {
        "single process"
    }
}

thread_local! {
    static WORLD: RefCell<Rc<dyn Collective>> = RefCell::new(Rc::new(Single));
}

/// Makes `c` this thread's world (the binary does it once, before any job runs).
pub fn install(c: Rc<dyn Collective>) {
    WORLD.with(|w| *w.borrow_mut() = c);
}

/// The world this job runs in ([`Single`] unless [`install`]ed).
pub fn world() -> Rc<dyn Collective> {
    WORLD.with(|w| w.borrow().clone())
}

/// Whether this process writes the job's files (rank 0).
pub fn is_root() -> bool {
    world().rank() == 0
}

/// The launcher's world size where this process was started by one as a task of a parallel
/// job (`mpirun`'s `OMPI_COMM_WORLD_SIZE`, a PMI launcher's `PMI_SIZE`, `srun`'s
/// `SLURM_STEP_NUM_TASKS`), else `None`. Not `SLURM_NTASKS`: a batch script's own shell has
/// it too, and a command run there directly is one process.
pub fn launched_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.parse().ok())
}

/// This process's rank among the ranks on its own host, as the launcher numbers them
/// (`mpirun`'s `OMPI_COMM_WORLD_LOCAL_RANK`, MPICH's `MPI_LOCALRANKID`, `srun`'s
/// `SLURM_LOCALID`), else `None`.
pub fn launched_local_rank() -> Option<usize> {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok()?.parse().ok())
}

/// The GPU of a rank, one per rank: its local rank where the launcher gives one (so every
/// host numbers its GPUs from 0), else `rank % count` (right when every host runs `count`
/// ranks in a block). `None` when the host has fewer GPUs than the local rank needs: two
/// ranks on one GPU is a launch mistake (NCCL refuses a duplicate GPU in one communicator).
pub fn device_ordinal(local_rank: Option<usize>, rank: usize, count: usize) -> Option<usize> {
    match local_rank {
        Some(l) => (l < count).then_some(l),
        None => (count > 0).then(|| rank % count),
    }
}

/// Combines per-rank metrics of equal-sized shares into the global batch's, in place: names
/// starting `max_` take the maximum over the ranks, `min_` the minimum, the rest the mean.
pub fn reduce_metrics(world: &dyn Collective, metrics: &mut [(String, f64)]) {
    let n = world.size() as f64;
    let mut mean: Vec<f64> = metrics.iter().map(|(_, v)| v / n).collect();
    world.all_reduce_sum_f64(&mut mean);
    // Minima as maxima of the negated values.
    let mut ext: Vec<f64> = metrics
        .iter()
        .map(|(k, v)| if k.starts_with("min_") { -v } else { *v })
        .collect();
    world.all_reduce_max_f64(&mut ext);
    for (((k, v), m), e) in metrics.iter_mut().zip(mean).zip(ext) {
        *v = if k.starts_with("max_") {
            e
        } else if k.starts_with("min_") {
            -e
        } else {
            m
        };
    }
}

/// Every rank's rows, in rank order, on every rank (an all-gather of ragged rows, made of
/// three sums: the counts, the lengths, the values, each rank's part at its offset and zeros
/// elsewhere).
pub fn all_gather_rows(world: &dyn Collective, rows: &[Vec<f32>]) -> Vec<Vec<f32>> {
    let (rank, size) = (world.rank(), world.size());
    if size == 1 {
        return rows.to_vec();
    }
    let mut counts = vec![0f64; size];
    counts[rank] = rows.len() as f64;
    world.all_reduce_sum_f64(&mut counts);
    let counts: Vec<usize> = counts.iter().map(|&c| c as usize).collect();
    let first: usize = counts[..rank].iter().sum();
    let total: usize = counts.iter().sum();
    let mut lens = vec![0f64; total];
    for (i, r) in rows.iter().enumerate() {
        lens[first + i] = r.len() as f64;
    }
    world.all_reduce_sum_f64(&mut lens);
    let lens: Vec<usize> = lens.iter().map(|&l| l as usize).collect();
    let at: usize = lens[..first].iter().sum();
    let mut flat = vec![0f32; lens.iter().sum()];
    let mut o = at;
    for r in rows {
        flat[o..o + r.len()].copy_from_slice(r);
        o += r.len();
    }
    world.all_reduce_sum_f32(&mut flat);
    let mut out = Vec::with_capacity(total);
    let mut o = 0;
    for l in lens {
        out.push(flat[o..o + l].to_vec());
        o += l;
    }
    out
}

/// [`all_gather_rows`] for token ids (exact: ids below 2²⁴ are exact in f32).
pub fn all_gather_ids(world: &dyn Collective, rows: &[Vec<u32>]) -> Vec<Vec<u32>> {
    assert!(
        rows.iter().flatten().all(|&t| t < 1 << 24),
        "token ids of 2^24 and more do not survive an f32 all-gather"
    );
    let f: Vec<Vec<f32>> = rows
        .iter()
        .map(|r| r.iter().map(|&t| t as f32).collect())
        .collect();
    all_gather_rows(world, &f)
        .into_iter()
        .map(|r| r.into_iter().map(|t| t as u32).collect())
        .collect()
}

/// Rank `rank`'s share of a global batch of `global` items: a contiguous run, the first
/// `global % size` ranks one item longer.
pub fn share(global: usize, rank: usize, size: usize) -> std::ops::Range<usize> {
    let (base, extra) = (global / size, global % size);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

#[cfg(feature = "mpi")]
pub mod mpi {
    //! The Open MPI backend (`mpi` crate).

    use mpi::collective::SystemOperation;
    use mpi::topology::{Communicator, SimpleCommunicator};
    use mpi::traits::*;

    /// MPI's world communicator; MPI is finalised when the [`Universe`](mpi::environment::Universe)
    /// that [`init`] returns is dropped.
    pub struct Mpi {
        pub(super) world: SimpleCommunicator,
    }

    /// Initialises MPI (single-threaded: only the main thread calls it) and returns the
    /// universe (keep it alive for the job) and the world's backend.
    pub fn init() -> Option<(mpi::environment::Universe, Mpi)> {
        let universe = mpi::initialize()?;
        let world = universe.world();
        Some((universe, Mpi { world }))
    }

    impl super::Collective for Mpi {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }
        fn size(&self) -> usize {
            self.world.size() as usize
        }
        fn all_reduce_sum_f32(&self, buf: &mut [f32]) {
            let send = buf.to_vec();
            self.world
                .all_reduce_into(&send[..], buf, SystemOperation::sum());
        }
        fn all_reduce_sum_f64(&self, buf: &mut [f64]) {
            let send = buf.to_vec();
            self.world
                .all_reduce_into(&send[..], buf, SystemOperation::sum());
        }
        fn all_reduce_max_f64(&self, buf: &mut [f64]) {
            let send = buf.to_vec();
            self.world
                .all_reduce_into(&send[..], buf, SystemOperation::max());
        }
        fn barrier(&self) {
            self.world.barrier();
        }
        fn abort(&self, code: i32) -> ! {
            self.world.abort(code)
        }
        fn name(&self) -> &'static str {
            "MPI"
        }
    }
}

#[cfg(feature = "nccl")]
pub mod nccl {
    //! The NCCL backend: one CUDA device per rank, the communicator bootstrapped over MPI
    //! (rank 0 makes NCCL's unique id and broadcasts it), which also keeps the rank, the size,
    //! the barrier and the abort; the all-reduces run on the GPUs.

    use std::sync::Arc;

    use cudarc::driver::{CudaContext, CudaStream, DeviceRepr};
    use cudarc::nccl::{Comm, Id, NcclType, ReduceOp};
    use mpi::traits::*;

    use super::mpi::Mpi;
    use super::Collective;

    /// Why NCCL could not start on this rank.
    #[derive(Debug, thiserror::Error)]
    pub enum InitError {
        /// The CUDA driver could not be asked for its devices.
        #[error("rank {rank}: CUDA devices could not be counted: {reason}")]
        Devices { rank: usize, reason: String },
        /// No GPU is left for this rank on its host.
        #[error(
            "rank {rank} (local rank {local_rank:?}) has no GPU of its own: this host has {count}; \
             start at most one rank per GPU"
        )]
        NoDevice {
            rank: usize,
            local_rank: Option<usize>,
            count: usize,
        },
        /// A CUDA or NCCL call failed while the communicator was made.
        #[error("rank {rank}, GPU {ordinal}: {step} failed: {reason}")]
        Setup {
            rank: usize,
            ordinal: usize,
            step: &'static str,
            reason: String,
        },
    }

    /// An NCCL communicator over the world's ranks, each on its own GPU.
    ///
    /// The [`Collective`] trait takes host slices, so each all-reduce stages its buffer through
    /// the GPU: copy in, all-reduce, copy back. Once the trainers keep their gradients on the
    /// GPU, a device-resident all-reduce can skip both copies.
    pub struct Nccl {
        mpi: Mpi,
        stream: Arc<CudaStream>,
        comm: Comm,
    }

    impl Nccl {
        /// Opens this rank's GPU ([`super::device_ordinal`]) and joins the NCCL communicator
        /// of every rank of `mpi` (a collective: every rank calls it). On failure the MPI
        /// world comes back with the error, to abort the job: the other ranks may be waiting
        /// in the communicator's set-up.
        pub fn new(mpi: Mpi) -> Result<Self, (Mpi, InitError)> {
            match Self::open(&mpi) {
                Ok((stream, comm)) => Ok(Self { mpi, stream, comm }),
                Err(e) => Err((mpi, e)),
            }
        }

        fn open(mpi: &Mpi) -> Result<(Arc<CudaStream>, Comm), InitError> {
            let (rank, size) = (mpi.rank(), mpi.size());
            let count = CudaContext::device_count().map_err(|e| InitError::Devices {
                rank,
                reason: e.to_string(),
            })?;
            let count = usize::try_from(count).unwrap_or(0);
            let local_rank = super::launched_local_rank();
            let ordinal =
                super::device_ordinal(local_rank, rank, count).ok_or(InitError::NoDevice {
                    rank,
                    local_rank,
                    count,
                })?;
            let setup = |step, reason: String| InitError::Setup {
                rank,
                ordinal,
                step,
                reason,
            };
            let ctx = CudaContext::new(ordinal)
                .map_err(|e| setup("opening the device", e.to_string()))?;
            let stream = ctx
                .new_stream()
                .map_err(|e| setup("making a stream", e.to_string()))?;
            let mut id = [0; 128];
            if rank == 0 {
                let own = Id::new().map_err(|e| setup("ncclGetUniqueId", format!("{:?}", e.0)))?;
                id = *own.internal();
            }
            mpi.world.process_at_rank(0).broadcast_into(&mut id[..]);
            let comm = Comm::from_rank(stream.clone(), rank, size, Id::uninit(id))
                .map_err(|e| setup("ncclCommInitRank", format!("{:?}", e.0)))?;
            Ok((stream, comm))
        }

        /// `buf` through the GPU: copy in, all-reduce in place, copy back. A failure ends the
        /// job: the other ranks would wait for this one in the next collective.
        fn all_reduce<T: NcclType + DeviceRepr>(&self, buf: &mut [T], op: ReduceOp) {
            if buf.is_empty() {
                return;
            }
            if let Err(e) = self.staged_all_reduce(buf, &op) {
                tracing::error!(
                    "rank {}: NCCL all-reduce of {} values failed: {e}; ending the job",
                    self.rank(),
                    buf.len()
                );
                self.abort(1);
            }
        }

        fn staged_all_reduce<T: NcclType + DeviceRepr>(
            &self,
            buf: &mut [T],
            op: &ReduceOp,
        ) -> Result<(), String> {
            let mut dev = self.stream.clone_htod(buf).map_err(|e| e.to_string())?;
            self.comm
                .all_reduce_in_place(&mut dev, op)
                .map_err(|e| format!("{:?}", e.0))?;
            self.stream
                .memcpy_dtoh(&dev, buf)
                .map_err(|e| e.to_string())?;
            // The copy back is asynchronous: `buf` is ready once the stream is.
            self.stream.synchronize().map_err(|e| e.to_string())
        }
    }

    impl Collective for Nccl {
        fn rank(&self) -> usize {
            self.mpi.rank()
        }
        fn size(&self) -> usize {
            self.mpi.size()
        }
        fn all_reduce_sum_f32(&self, buf: &mut [f32]) {
            self.all_reduce(buf, ReduceOp::Sum);
        }
        fn all_reduce_sum_f64(&self, buf: &mut [f64]) {
            self.all_reduce(buf, ReduceOp::Sum);
        }
        fn all_reduce_max_f64(&self, buf: &mut [f64]) {
            self.all_reduce(buf, ReduceOp::Max);
        }
        fn barrier(&self) {
            self.mpi.barrier();
        }
        fn abort(&self, code: i32) -> ! {
            self.mpi.abort(code)
        }
        fn name(&self) -> &'static str {
            "NCCL"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_the_batch_in_order() {
        for global in 0..12 {
            for size in 1..5 {
                let mut next = 0;
                for r in 0..size {
                    let s = share(global, r, size);
                    assert_eq!(s.start, next, "{global} over {size}");
                    assert!(s.len() == global / size || s.len() == global / size + 1);
                    next = s.end;
                }
                assert_eq!(next, global);
            }
        }
    }

    #[test]
    fn a_rank_gets_its_local_gpu_or_none() {
        // The launcher's local rank picks the GPU, whatever the global rank.
        assert_eq!(device_ordinal(Some(1), 9, 4), Some(1));
        assert_eq!(device_ordinal(Some(3), 3, 4), Some(3));
        // More ranks on a host than GPUs: no sharing.
        assert_eq!(device_ordinal(Some(4), 4, 4), None);
        // No local rank: the global rank wraps over the host's GPUs.
        assert_eq!(device_ordinal(None, 5, 4), Some(1));
        assert_eq!(device_ordinal(None, 0, 1), Some(0));
        // No GPU at all.
        assert_eq!(device_ordinal(None, 0, 0), None);
        assert_eq!(device_ordinal(Some(0), 0, 0), None);
    }

    #[test]
    fn the_single_world_is_the_identity() {
        let w = world();
        assert_eq!((w.rank(), w.size()), (0, 1));
        let mut v = [1.5f32, -2.0];
        w.all_reduce_sum_f32(&mut v);
        assert_eq!(v, [1.5, -2.0]);
        assert!(is_root());
    }
}
