//! The collective-communication interface the parallel strategies are written against, and the
//! process-group layout (which ranks talk to which) of a [`super::Plan`].
//!
//! A [`Communicator`] is one rank's handle on one group. Every member of the group must call the
//! same collectives in the same order (SPMD), exactly as with NCCL. Two backends implement it:
//! [`super::threads`] (in-process, CPU tensors; every strategy runs in CI without a GPU) and
//! [`super::nccl`] (one thread per GPU, NCCL through cudarc).

use tch::{Device, Kind, TchError, Tensor};

/// A failed collective. Mapped into the engine's error type by the callers: an NCCL failure is a
/// device failure (the worker quarantines the GPU set and rebuilds the groups).
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error(transparent)]
    Torch(#[from] TchError),
    /// The backend reported an error (NCCL result code, a peer thread that went away).
    #[error("{backend} {op} failed on rank {rank}: {message}")]
    Backend {
        backend: &'static str,
        op: &'static str,
        rank: usize,
        message: String,
    },
    /// A peer did not arrive within the group's timeout (a hung or dead GPU/thread).
    #[error("{backend} {op} timed out on rank {rank} after {secs} s")]
    Timeout {
        backend: &'static str,
        op: &'static str,
        rank: usize,
        secs: u64,
    },
    /// The group was aborted (by [`Communicator::abort`] on any member); it cannot be used again.
    #[error("{backend} group aborted")]
    Aborted { backend: &'static str },
    /// The caller passed tensors that do not fit the collective.
    #[error("bad {op} arguments: {message}")]
    Usage { op: &'static str, message: String },
}

impl From<CommError> for TchError {
    /// The model code's error type is `TchError`; keep the backend name in the message so
    /// [`crate::EngineError`]'s classification sees "NCCL" failures as device failures.
    fn from(e: CommError) -> Self {
        match e {
            CommError::Torch(t) => t,
            other => TchError::Torch(format!("collective: {other}")),
        }
    }
}

pub type CommResult<T> = Result<T, CommError>;

/// One rank's handle on a process group. Collectives block the calling thread until the rank's
/// part is enqueued (NCCL: on the device's compute stream, so later kernels see the result) or
/// done (threads). Tensors are on [`Communicator::device`].
pub trait Communicator: Send {
    /// This rank's index in the group, `0..size`.
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// `threads` or `nccl`.
    fn backend(&self) -> &'static str;
    /// The device this rank's tensors live on.
    fn device(&self) -> Device;

    /// Sends `inputs[j]` to rank `j` and returns `out[j]` = what rank `j` sent to this rank, with
    /// shape `out_shapes[j]` (every rank knows its peers' shapes from the plan's layout). The kind
    /// of all tensors is `inputs[0]`'s.
    fn all_to_all(&self, inputs: &[Tensor], out_shapes: &[Vec<i64>]) -> CommResult<Vec<Tensor>>;

    /// [`Communicator::all_to_all`] into buffers the caller owns, `m` chunks per peer:
    /// `inputs[j * m + c]` goes to rank `j`, and `outputs[j * m + c]` receives chunk `c` from rank
    /// `j` (`inputs.len() == outputs.len() == m * size`). Every output must be contiguous (a
    /// contiguous view into a larger buffer is fine: that is the point, the received chunks land
    /// where the next op reads them). The default goes through `all_to_all` and copies.
    fn all_to_all_into(&self, inputs: &[Tensor], outputs: &[Tensor]) -> CommResult<()> {
        let n = self.size();
        let m = chunks_per_peer("all_to_all_into", n, inputs, outputs)?;
        for c in 0..m {
            let ins: Vec<Tensor> = (0..n).map(|j| inputs[j * m + c].shallow_clone()).collect();
            let shapes: Vec<Vec<i64>> = (0..n).map(|j| outputs[j * m + c].size()).collect();
            for (j, t) in self.all_to_all(&ins, &shapes)?.into_iter().enumerate() {
                outputs[j * m + c].shallow_clone().f_copy_(&t)?;
            }
        }
        Ok(())
    }

    /// Starts [`Communicator::all_to_all_into`] and returns before the compute stream has been
    /// ordered after it, so that compute work enqueued before [`Pending::wait`] overlaps the
    /// exchange (NCCL on its side stream; the Ulysses attention runs the single blocks' MLP
    /// matmuls there). Until the wait the outputs must not be read, nor the inputs written.
    /// The default completes the exchange before returning (nothing to overlap).
    fn start_all_to_all_into<'a>(&'a self, inputs: &[Tensor], outputs: &[Tensor]) -> CommResult<Pending<'a>> {
        self.all_to_all_into(inputs, outputs)?;
        Ok(Pending::done())
    }

    /// Every rank's `t` (same shape and kind on all ranks), in rank order.
    fn all_gather(&self, t: &Tensor) -> CommResult<Vec<Tensor>>;

    /// Elementwise sum over ranks (returned; `t` is not modified).
    fn all_reduce_sum(&self, t: &Tensor) -> CommResult<Tensor>;

    /// Rank `root`'s `t`; on other ranks `t` only gives the shape and kind.
    fn broadcast(&self, t: &Tensor, root: usize) -> CommResult<Tensor>;

    /// Point-to-point send to `dst`; pairs with a [`Communicator::recv`] on `dst`.
    fn send(&self, t: &Tensor, dst: usize) -> CommResult<()>;

    /// Receives a tensor of `shape` and `kind` from `src`.
    fn recv(&self, shape: &[i64], kind: Kind, src: usize) -> CommResult<Tensor>;

    /// Sends `t` to `dst` and receives a tensor of `shape` and `kind` from `src` as one step, so
    /// that every rank doing it around a ring cannot deadlock.
    fn send_recv(&self, t: &Tensor, dst: usize, shape: &[i64], kind: Kind, src: usize) -> CommResult<Tensor> {
        self.send(t, dst)?;
        self.recv(shape, kind, src)
    }

    /// [`Communicator::send_recv`] started, not finished: returns the tensor the message lands
    /// in and a [`Pending`] that orders the compute stream after the exchange, so that compute
    /// work enqueued before [`Pending::wait`] overlaps it (Ring attention attends over the K/V
    /// block it holds while the next one travels; NCCL on its side stream). Until the wait the
    /// received tensor must not be read, nor `t` written. The default completes the exchange
    /// before returning.
    fn start_send_recv<'a>(
        &'a self,
        t: &Tensor,
        dst: usize,
        shape: &[i64],
        kind: Kind,
        src: usize,
    ) -> CommResult<(Tensor, Pending<'a>)> {
        Ok((self.send_recv(t, dst, shape, kind, src)?, Pending::done()))
    }

    /// Returns once every rank has called it.
    fn barrier(&self) -> CommResult<()>;

    /// Aborts the group: pending and later collectives on every member fail with
    /// [`CommError::Aborted`] instead of hanging (used when a GPU fails mid-job).
    fn abort(&self);

    /// A handle that aborts this group from any thread (the driver's step watchdog holds one
    /// per group while the ranks run).
    fn abort_handle(&self) -> AbortHandle;

    /// Whether [`Communicator::abort`] was called on any member (work captured in a CUDA graph
    /// checks it before a replay: a replay does not pass through the communicator).
    fn is_aborted(&self) -> bool {
        false
    }

    /// Whether the collectives are device work on libtorch's current stream, so a CUDA graph
    /// of a step can capture them (NCCL). The threads backend exchanges through host memory:
    /// a captured step would replay stale exchanges, so steps over it run eagerly.
    fn capturable(&self) -> bool {
        false
    }
}

/// A started collective ([`Communicator::start_all_to_all_into`]) that the compute stream is not
/// yet ordered after. [`Pending::wait`] orders it (NCCL: the compute stream waits for the
/// collective's event) and then releases the tensors the collective reads and writes, which it
/// holds until then: their memory must not go back to the caching allocator while the exchange
/// may still touch it. Dropped without a wait (an error path), it waits all the same.
#[must_use = "a started collective must be waited for before its outputs are read"]
pub struct Pending<'a> {
    join: Option<Box<dyn FnOnce() -> CommResult<()> + 'a>>,
}

impl<'a> Pending<'a> {
    /// A collective that is already complete (in stream order).
    pub fn done() -> Self {
        Self { join: None }
    }

    /// A collective that `join` orders the compute stream after.
    pub fn new(join: impl FnOnce() -> CommResult<()> + 'a) -> Self {
        Self {
            join: Some(Box::new(join)),
        }
    }

    /// Orders the compute stream after the collective: work enqueued from now on sees its
    /// outputs.
    pub fn wait(mut self) -> CommResult<()> {
        match self.join.take() {
            Some(join) => join(),
            None => Ok(()),
        }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Some(join) = self.join.take()
            && let Err(e) = join()
        {
            tracing::warn!(error = %e, "ordering the compute stream after a started collective failed");
        }
    }
}

impl std::fmt::Debug for Pending<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("outstanding", &self.join.is_some())
            .finish()
    }
}

/// Checks the arguments of [`Communicator::all_to_all`] for a group of `n`: one input and one
/// output shape per rank.
pub fn check_all_to_all(n: usize, inputs: &[Tensor], out_shapes: &[Vec<i64>]) -> CommResult<()> {
    if inputs.len() != n || out_shapes.len() != n {
        return Err(CommError::Usage {
            op: "all_to_all",
            message: format!(
                "{} inputs / {} shapes for {n} ranks",
                inputs.len(),
                out_shapes.len()
            ),
        });
    }
    Ok(())
}

/// Checks the arguments of [`Communicator::all_to_all_into`] for a group of `n`: returns the
/// chunks per peer.
pub fn chunks_per_peer(
    op: &'static str,
    n: usize,
    inputs: &[Tensor],
    outputs: &[Tensor],
) -> CommResult<usize> {
    if n == 0 || inputs.len() != outputs.len() || !inputs.len().is_multiple_of(n) || inputs.is_empty() {
        return Err(CommError::Usage {
            op,
            message: format!(
                "{} inputs / {} outputs: both must be the same non-zero multiple of {n} ranks",
                inputs.len(),
                outputs.len()
            ),
        });
    }
    if let Some(i) = outputs.iter().position(|o| !o.is_contiguous()) {
        return Err(CommError::Usage {
            op,
            message: format!("output {i} is not contiguous"),
        });
    }
    Ok(inputs.len() / n)
}

/// Aborts a group from any thread (see [`Communicator::abort_handle`]).
pub type AbortHandle = std::sync::Arc<dyn Fn() + Send + Sync>;

/// Creates groups for a set of global ranks (one device per global rank).
pub trait CommFactory {
    /// One communicator per member of `members` (global ranks), in `members` order; member `i`
    /// gets group rank `i`.
    fn group(&self, members: &[usize]) -> CommResult<Vec<Box<dyn Communicator>>>;
}

/// The degrees of a parallel plan and the rank layout they imply:
/// `global = cfg_idx * sp + (ring_idx * ulysses + ulysses_idx)` with
/// `sp = pipe * ring * ulysses * patch`. PipeFusion (`pipe > 1`) runs with `ring = ulysses = 1`;
/// its stages are the `sp` group. Patch parallelism of a UNet (`patch > 1`, row bands of the
/// latent) runs alone in a branch too: the `sp` group is the patch group (band index = its
/// rank), and the CFG group joins the same band of both branches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Mesh {
    pub cfg: usize,
    pub pipe: usize,
    pub ring: usize,
    pub ulysses: usize,
    #[serde(default = "one")]
    pub patch: usize,
}

fn one() -> usize {
    1
}

impl Mesh {
    /// One rank: no parallelism.
    pub const SINGLE: Mesh = Mesh {
        cfg: 1,
        pipe: 1,
        ring: 1,
        ulysses: 1,
        patch: 1,
    };

    pub fn world(&self) -> usize {
        self.cfg * self.sp()
    }

    /// Ranks working on one sequence (one CFG branch): the sequence-parallel, pipeline or patch
    /// group.
    pub fn sp(&self) -> usize {
        self.pipe * self.ring * self.ulysses * self.patch
    }

    /// `(cfg_idx, ring_idx, ulysses_idx)` of a global rank (with `pipe = 1`).
    pub fn coords(&self, global: usize) -> (usize, usize, usize) {
        let u = global % self.ulysses;
        let r = (global / self.ulysses) % self.ring;
        let c = global / self.sp();
        (c, r, u)
    }

    pub fn global(&self, cfg: usize, ring: usize, ulysses: usize) -> usize {
        cfg * self.sp() + ring * self.ulysses + ulysses
    }

    /// The groups of each kind, each a list of global ranks in group-rank order.
    fn groups(&self, kind: GroupKind) -> Vec<Vec<usize>> {
        let mut out = Vec::new();
        if (self.pipe > 1 || self.patch > 1) && matches!(kind, GroupKind::Ulysses | GroupKind::Ring) {
            // PipeFusion stages and UNet bands do not split heads or pass K/V blocks around a
            // ring: singleton groups.
            return (0..self.world()).map(|g| vec![g]).collect();
        }
        match kind {
            GroupKind::Ulysses => {
                for c in 0..self.cfg {
                    for r in 0..self.ring {
                        out.push((0..self.ulysses).map(|u| self.global(c, r, u)).collect());
                    }
                }
            }
            GroupKind::Ring => {
                for c in 0..self.cfg {
                    for u in 0..self.ulysses {
                        out.push((0..self.ring).map(|r| self.global(c, r, u)).collect());
                    }
                }
            }
            GroupKind::Sp => {
                for c in 0..self.cfg {
                    out.push((0..self.sp()).map(|i| c * self.sp() + i).collect());
                }
            }
            GroupKind::Cfg => {
                for i in 0..self.sp() {
                    out.push((0..self.cfg).map(|c| c * self.sp() + i).collect());
                }
            }
        }
        out
    }
}

#[derive(Debug, Clone, Copy)]
enum GroupKind {
    Ulysses,
    Ring,
    Sp,
    Cfg,
}

/// Everything one rank needs to talk to its peers under a [`Mesh`].
pub struct RankComms {
    pub mesh: Mesh,
    /// Global rank.
    pub rank: usize,
    pub world: Box<dyn Communicator>,
    /// Ranks splitting the heads of one sequence chunk (all-to-all).
    pub ulysses: Box<dyn Communicator>,
    /// Ranks passing K/V blocks around a ring.
    pub ring: Box<dyn Communicator>,
    /// All ranks of one CFG branch (the sequence-parallel group).
    pub sp: Box<dyn Communicator>,
    /// The same position in each CFG branch (exchange of noise predictions).
    pub cfg: Box<dyn Communicator>,
}

impl std::fmt::Debug for RankComms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RankComms")
            .field("mesh", &self.mesh)
            .field("rank", &self.rank)
            .field("backend", &self.world.backend())
            .finish()
    }
}

impl RankComms {
    /// Builds every group of `mesh` with `factory`; returns one [`RankComms`] per rank of the
    /// mesh. `base` offsets the ranks passed to the factory (which maps them to devices): the
    /// data-parallel group `g` of a node uses `base = g * mesh.world()`.
    pub fn build(mesh: Mesh, factory: &dyn CommFactory, base: usize) -> CommResult<Vec<RankComms>> {
        let n = mesh.world();
        let mut slots: Vec<[Option<Box<dyn Communicator>>; 5]> = (0..n).map(|_| Default::default()).collect();
        let world: Vec<usize> = (0..n).collect();
        let kinds: [(usize, Vec<Vec<usize>>); 5] = [
            (0, vec![world]),
            (1, mesh.groups(GroupKind::Ulysses)),
            (2, mesh.groups(GroupKind::Ring)),
            (3, mesh.groups(GroupKind::Sp)),
            (4, mesh.groups(GroupKind::Cfg)),
        ];
        for (slot, groups) in kinds {
            for members in groups {
                let on_node: Vec<usize> = members.iter().map(|m| m + base).collect();
                for (comm, &g) in factory.group(&on_node)?.into_iter().zip(&members) {
                    slots[g][slot] = Some(comm);
                }
            }
        }
        Ok(slots
            .into_iter()
            .enumerate()
            .map(|(rank, s)| {
                let [w, u, r, sp, c] = s.map(|c| c.expect("every rank is in one group of each kind"));
                RankComms {
                    mesh,
                    rank,
                    world: w,
                    ulysses: u,
                    ring: r,
                    sp,
                    cfg: c,
                }
            })
            .collect())
    }

    /// Abort handles of every group this rank belongs to.
    pub fn abort_handles(&self) -> Vec<AbortHandle> {
        [&self.world, &self.ulysses, &self.ring, &self.sp, &self.cfg]
            .iter()
            .map(|c| c.abort_handle())
            .collect()
    }

    /// Whether any group this rank belongs to was aborted.
    pub fn is_aborted(&self) -> bool {
        [&self.world, &self.ulysses, &self.ring, &self.sp, &self.cfg]
            .iter()
            .any(|c| c.is_aborted())
    }

    /// Whether every group's collectives can be captured in a CUDA graph
    /// ([`Communicator::capturable`]).
    pub fn is_capturable(&self) -> bool {
        [&self.world, &self.ulysses, &self.ring, &self.sp, &self.cfg]
            .iter()
            .all(|c| c.capturable())
    }

    /// Aborts every group this rank belongs to.
    pub fn abort(&self) {
        for c in [&self.world, &self.ulysses, &self.ring, &self.sp, &self.cfg] {
            c.abort();
        }
    }
}

/// Splits `n` items into `parts` contiguous chunks whose lengths differ by at most one (the
/// first `n % parts` chunks are one longer). Returns `(start, len)` per part.
pub fn balanced_split(n: i64, parts: usize) -> Vec<(i64, i64)> {
    let p = parts as i64;
    let (base, extra) = (n / p, n % p);
    let mut start = 0;
    (0..p)
        .map(|i| {
            let len = base + i64::from(i < extra);
            let r = (start, len);
            start += len;
            r
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_groups_cover_every_rank_once_per_kind() {
        let mesh = Mesh {
            cfg: 2,
            ring: 2,
            ulysses: 2,
            ..Mesh::SINGLE
        };
        for kind in [GroupKind::Ulysses, GroupKind::Ring, GroupKind::Sp, GroupKind::Cfg] {
            let mut all: Vec<usize> = mesh.groups(kind).concat();
            all.sort();
            assert_eq!(all, (0..8).collect::<Vec<_>>(), "{kind:?}");
        }
        assert_eq!(mesh.groups(GroupKind::Ulysses)[1], vec![2, 3]);
        assert_eq!(mesh.groups(GroupKind::Ring)[0], vec![0, 2]);
        assert_eq!(mesh.groups(GroupKind::Cfg)[3], vec![3, 7]);
        for g in 0..8 {
            let (c, r, u) = mesh.coords(g);
            assert_eq!(mesh.global(c, r, u), g);
        }
    }

    /// `cfg=2,patch=2`: a patch group per branch (ranks 0-1 and 2-3, band index = group rank)
    /// and a CFG group per band index (ranks 0 and 2, 1 and 3).
    #[test]
    fn patch_mesh_pairs_the_same_band_of_both_branches() {
        let mesh = Mesh {
            cfg: 2,
            patch: 2,
            ..Mesh::SINGLE
        };
        assert_eq!((mesh.world(), mesh.sp()), (4, 2));
        assert_eq!(mesh.groups(GroupKind::Sp), vec![vec![0, 1], vec![2, 3]]);
        assert_eq!(mesh.groups(GroupKind::Cfg), vec![vec![0, 2], vec![1, 3]]);
        assert_eq!(
            mesh.groups(GroupKind::Ulysses),
            (0..4).map(|g| vec![g]).collect::<Vec<_>>()
        );
        assert_eq!(
            mesh.groups(GroupKind::Ring),
            (0..4).map(|g| vec![g]).collect::<Vec<_>>()
        );
        // Meshes serialised before the field existed have no patch degree.
        let old: Mesh = serde_json::from_str(r#"{"cfg":2,"pipe":1,"ring":1,"ulysses":2}"#).unwrap();
        assert_eq!(old.patch, 1);
    }

    #[test]
    fn balanced_split_is_contiguous_and_even() {
        assert_eq!(balanced_split(10, 4), vec![(0, 3), (3, 3), (6, 2), (8, 2)]);
        assert_eq!(balanced_split(8, 2), vec![(0, 4), (4, 4)]);
        assert_eq!(balanced_split(1, 2), vec![(0, 1), (1, 0)]);
    }
}
