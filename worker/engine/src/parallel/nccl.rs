//! NCCL backend (through `cudarc`, NCCL loaded at run time): one process per node, one thread
//! per GPU, a communicator per (group, GPU).
//!
//! Collectives are ordered with libtorch's current CUDA stream (the legacy default stream, or the
//! capture stream while a CUDA graph of a step is captured): on a side stream joined to it by
//! events (default), or on it directly, so kernels before and after a collective are ordered
//! with it. Tensors are passed by their `data_ptr()`; every buffer is contiguous and
//! stays alive (owned by the caller or returned) until the stream has consumed it, which the
//! caching allocator guarantees for tensors freed after enqueueing work on the same stream.
//!
//! Groups on one node are created with `ncclCommInitAll`; a group spanning nodes is the same
//! code with [`NcclComm::init_rank`] and a unique id exchanged out of band (e.g. through Redis):
//! a configuration of [`NcclFactory`], not another backend.
//!
//! Library loading trap: `cudarc` opens `libnccl.so` by name, while libtorch_cuda already loaded
//! its own `libnccl.so.2`; two different NCCLs in one process corrupt each other's
//! communicators. [`check_single_nccl`] refuses to run in that state (the launcher puts a
//! `libnccl.so` symlink to torch's copy first on `LD_LIBRARY_PATH`; see docs/operations.md).
#![allow(unsafe_code)] // FFI to NCCL: every unsafe block states what it relies on.

use std::collections::BTreeSet;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::nccl::result as nccl;
use cudarc::nccl::sys;
use tch::{Device, Kind, Tensor};

use super::comm::{CommError, CommFactory, CommResult, Communicator, Pending};
use super::stream::{SideStream, compute_stream};

const BACKEND: &str = "NCCL";

fn dtype(kind: Kind, op: &'static str) -> CommResult<sys::ncclDataType_t> {
    use sys::ncclDataType_t as D;
    Ok(match kind {
        Kind::Float => D::ncclFloat32,
        Kind::BFloat16 => D::ncclBfloat16,
        Kind::Half => D::ncclFloat16,
        Kind::Double => D::ncclFloat64,
        Kind::Int64 => D::ncclInt64,
        Kind::Int => D::ncclInt32,
        Kind::Uint8 => D::ncclUint8,
        Kind::Int8 => D::ncclInt8,
        other => {
            return Err(CommError::Usage {
                op,
                message: format!("no NCCL type for {other:?}"),
            });
        }
    })
}

/// Where NCCL kernels run: `legacy` = libtorch's current stream (the one it computes on); `side`
/// (default) = a stream of the communicator's own, ordered with the compute stream by events
/// (compute -> collective -> compute). On the legacy stream the host blocks in NCCL calls until
/// the GPU catches up, so host launches and GPU work serialise per collective.
/// `DITFLEET_NCCL_STREAM=legacy|side`, read once.
fn use_side_stream() -> bool {
    !crate::settings::bench().nccl_legacy_stream
}

/// See [`NcclComm::prepare_into`]: `runs` = `(send, recv, count)` per chunk for `ncclAlltoAll`.
struct IntoPlan {
    ins: Vec<Tensor>,
    m: usize,
    runs: Option<Vec<(usize, usize, usize)>>,
}

/// How an `all_to_all_into` whose pieces lie back to back goes over NCCL: grouped
/// `ncclSend`/`ncclRecv` per peer and piece, or one `ncclAlltoAll` per piece (NCCL 2.28+).
/// Uneven pieces always take the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllToAll {
    P2p,
    Collective,
}

impl AllToAll {
    /// The process default: grouped send/recv, or `ncclAlltoAll` under the benchmark switch
    /// `DITFLEET_NCCL_A2A=collective`.
    pub fn from_env() -> AllToAll {
        if crate::settings::bench().nccl_collective_a2a {
            AllToAll::Collective
        } else {
            AllToAll::P2p
        }
    }
}

fn cuda_err(op: &'static str, rank: usize, e: cudarc::driver::DriverError) -> CommError {
    CommError::Backend {
        backend: "CUDA",
        op,
        rank,
        message: e.to_string(),
    }
}

/// Returns the NCCL version the process uses, after checking that only one NCCL library is
/// mapped into it (see the module docs).
pub fn check_single_nccl() -> CommResult<i32> {
    let version = nccl::get_nccl_version().map_err(|e| backend_err("load", 0, e))?;
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let libs: BTreeSet<&str> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| p.contains("libnccl"))
        .collect();
    if libs.len() > 1 {
        return Err(CommError::Backend {
            backend: BACKEND,
            op: "load",
            rank: 0,
            message: format!(
                "two NCCL libraries are loaded ({}): put a libnccl.so symlink to torch's \
                 nvidia/nccl/lib/libnccl.so.2 first on LD_LIBRARY_PATH",
                libs.into_iter().collect::<Vec<_>>().join(", ")
            ),
        });
    }
    Ok(version)
}

/// Makes CUDA device `ordinal` (its primary context, the one the CUDA runtime and libtorch use)
/// current on the calling thread, so NCCL calls from a rank thread target that rank's GPU.
/// The context is retained for the life of the process.
pub fn bind_thread_to_device(ordinal: usize) -> CommResult<()> {
    let ctx = cudarc::driver::CudaContext::new(ordinal).map_err(|e| CommError::Backend {
        backend: "CUDA",
        op: "bind device",
        rank: ordinal,
        message: e.to_string(),
    })?;
    ctx.bind_to_thread().map_err(|e| CommError::Backend {
        backend: "CUDA",
        op: "bind device",
        rank: ordinal,
        message: e.to_string(),
    })?;
    std::mem::forget(ctx);
    Ok(())
}

fn backend_err(op: &'static str, rank: usize, e: nccl::NcclError) -> CommError {
    CommError::Backend {
        backend: BACKEND,
        op,
        rank,
        message: format!("{:?}", e.0),
    }
}

/// An NCCL communicator handle.
#[derive(Clone, Copy)]
struct RawComm(sys::ncclComm_t);

// SAFETY: an ncclComm_t may be used from any thread as long as calls on it are not concurrent;
// each `NcclComm` is owned by exactly one rank thread, and the group's abort path only calls
// `ncclCommAbort`, which NCCL documents as callable from another thread to release a hung comm.
unsafe impl Send for RawComm {}
// SAFETY: shared only as a pointer value inside `Group`; every NCCL call on it happens under the
// member's lock in `Group::calls` (or is the abort of a member stuck in a call, see there).
unsafe impl Sync for RawComm {}

/// State shared by the members of a group created in this process.
struct Group {
    aborted: AtomicBool,
    /// Every member's handle (fixed at creation).
    handles: Vec<RawComm>,
    /// One lock per member: the member's thread holds it while it is inside an NCCL call, and
    /// [`Group::abort_all`] takes it before aborting that member's handle, so an abort from a
    /// failing rank's thread does not race a peer's in-flight NCCL call on the same communicator
    /// (NCCL communicators are not thread-safe). The flag: the handle was released (aborted or
    /// destroyed), so nobody calls NCCL on it again.
    calls: Vec<Mutex<bool>>,
}

/// How long an abort waits for a member to leave an NCCL call before aborting it anyway (a call
/// blocked on a dead peer is exactly what `ncclCommAbort` exists to release).
const ABORT_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl Group {
    fn new(comms: Vec<RawComm>) -> Arc<Self> {
        Arc::new(Self {
            aborted: AtomicBool::new(false),
            calls: comms.iter().map(|_| Mutex::new(false)).collect(),
            handles: comms,
        })
    }

    /// Aborts every member's handle, each once, after `aborted` was set by the caller (so no
    /// member starts another NCCL call on it). Each handle is aborted on a thread of its own and
    /// this returns without waiting: `ncclCommAbort` first raises the communicator's abort flag
    /// (which releases its kernels) and then frees its resources, which waits for the device to
    /// go idle. A rank belongs to several groups (world, sp, ulysses, ring, cfg) and a dead peer
    /// leaves a kernel of any one of them spinning; aborting them one after the other from one
    /// thread deadlocks as soon as the first abort's cleanup waits for a device whose kernel
    /// belongs to a later group (seen on nvidia-h200-x4: bench/parallel/results/h200x4-drill1).
    fn abort_all(self: &Arc<Self>, by_rank: usize) {
        for i in 0..self.handles.len() {
            let group = self.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("nccl-abort-{i}"))
                .spawn(move || group.abort_member(i, by_rank));
            if let Err(e) = spawned {
                tracing::warn!(by_rank, member = i, error = %e, "no thread for the abort: aborting inline");
                self.abort_member(i, by_rank);
            }
        }
    }

    fn abort_member(&self, i: usize, by_rank: usize) {
        let (lock, c) = (&self.calls[i], self.handles[i]);
        let deadline = std::time::Instant::now() + ABORT_LOCK_WAIT;
        let mut guard = loop {
            match lock.try_lock() {
                Ok(g) => break Some(g),
                Err(std::sync::TryLockError::Poisoned(p)) => break Some(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(std::sync::TryLockError::WouldBlock) => {
                    tracing::warn!(
                        by_rank,
                        member = i,
                        "member still inside an NCCL call: aborting it anyway"
                    );
                    break None;
                }
            }
        };
        if let Some(g) = guard.as_mut() {
            if **g {
                return; // already released by its owner's Drop
            }
            **g = true;
        }
        // SAFETY: not released yet (checked under the lock, which is held through the abort so
        // the owner's Drop waits) and marked released, so aborted once. A member still inside a
        // call after the wait is blocked on a dead peer (its owner cannot be dropping it), which
        // ncclCommAbort is documented to release from another thread.
        match unsafe { nccl::comm_abort(c.0) } {
            Ok(_) => tracing::info!(by_rank, member = i, "NCCL communicator aborted"),
            Err(e) => tracing::warn!(by_rank, member = i, error = ?e.0, "ncclCommAbort failed"),
        }
    }
}

/// One rank of an NCCL group.
pub struct NcclComm {
    comm: RawComm,
    rank: usize,
    size: usize,
    device: Device,
    /// Shared by the members of the group: [`Communicator::abort`] on any of them aborts all.
    group: Arc<Group>,
    /// This communicator's index in `group`'s handles and locks.
    member: usize,
    /// Created on first use, on the owning (rank) thread with the rank's device current.
    side: std::cell::OnceCell<SideStream>,
    /// [`AllToAll`] of this communicator (every member must use the same).
    a2a: std::cell::Cell<AllToAll>,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclComm({}/{} on {:?})", self.rank, self.size, self.device)
    }
}

impl NcclComm {
    /// One communicator per device of `devices` (CUDA ordinals), created together in this
    /// thread; member `i` has rank `i`.
    pub fn init_all(devices: &[i32]) -> CommResult<Vec<NcclComm>> {
        check_single_nccl()?;
        let n = devices.len();
        let mut raw: Vec<sys::ncclComm_t> = vec![std::ptr::null_mut(); n];
        // SAFETY: `raw` has room for `n` handles and `devices` holds `n` ordinals.
        unsafe { nccl::comm_init_all(raw.as_mut_ptr(), n as i32, devices.as_ptr()) }
            .map_err(|e| backend_err("init_all", 0, e))?;
        let group = Group::new(raw.iter().map(|&c| RawComm(c)).collect());
        Ok(raw
            .into_iter()
            .zip(devices)
            .enumerate()
            .map(|(rank, (c, &d))| NcclComm {
                comm: RawComm(c),
                rank,
                size: n,
                device: Device::Cuda(d as usize),
                group: group.clone(),
                member: rank,
                side: std::cell::OnceCell::new(),
                a2a: std::cell::Cell::new(AllToAll::from_env()),
            })
            .collect())
    }

    /// A new unique id for [`NcclComm::init_rank`] (created by rank 0, shared out of band).
    pub fn unique_id() -> CommResult<[u8; 128]> {
        let id = nccl::get_uniqueid().map_err(|e| backend_err("unique_id", 0, e))?;
        Ok(id.internal.map(|c| c as u8))
    }

    /// Joins the group identified by `id` as `rank` of `size` on CUDA device `device` (the
    /// multi-node path; every member calls it concurrently, from its own thread or process).
    /// The calling thread must have `device` current.
    pub fn init_rank(id: [u8; 128], size: usize, rank: usize, device: i32) -> CommResult<NcclComm> {
        check_single_nccl()?;
        let uid = sys::ncclUniqueId {
            internal: id.map(|b| b as std::ffi::c_char),
        };
        let mut raw: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer; `uid` is a unique id from `unique_id`.
        unsafe { nccl::comm_init_rank(&mut raw, size as i32, uid, rank as i32) }
            .map_err(|e| backend_err("init_rank", rank, e))?;
        Ok(NcclComm {
            comm: RawComm(raw),
            rank,
            size,
            device: Device::Cuda(device as usize),
            // Members in other processes see the abort through NCCL's own error propagation.
            group: Group::new(vec![RawComm(raw)]),
            member: 0,
            side: std::cell::OnceCell::new(),
            a2a: std::cell::Cell::new(AllToAll::from_env()),
        })
    }

    /// Sets how `all_to_all_into` goes over NCCL (default [`AllToAll::from_env`]). Every member
    /// of the group must switch at the same point of its sequence of collectives.
    pub fn set_all_to_all(&self, mode: AllToAll) {
        self.a2a.set(mode);
    }

    fn check(&self) -> CommResult<()> {
        if self.group.aborted.load(Ordering::SeqCst) {
            return Err(CommError::Aborted { backend: BACKEND });
        }
        Ok(())
    }

    fn contiguous_on_device(&self, t: &Tensor, op: &'static str) -> CommResult<Tensor> {
        if t.device() != self.device {
            return Err(CommError::Usage {
                op,
                message: format!("tensor on {:?}, communicator on {:?}", t.device(), self.device),
            });
        }
        Ok(t.f_contiguous()?)
    }

    fn side(&self) -> CommResult<&SideStream> {
        if let Some(s) = self.side.get() {
            return Ok(s);
        }
        let s = SideStream::new().map_err(|e| cuda_err("stream", self.rank, e))?;
        Ok(self.side.get_or_init(|| s))
    }

    /// Runs `enqueue(stream)` with NCCL work on the stream chosen by [`use_side_stream`]: the
    /// side stream first waits for the compute stream's work so far, and the compute stream
    /// waits for the collective before anything enqueued after it. Tensors freed after the
    /// call are only reused by compute work ordered after the collective.
    fn on_stream(
        &self,
        op: &'static str,
        enqueue: impl FnOnce(sys::cudaStream_t) -> CommResult<()>,
    ) -> CommResult<()> {
        if let Some(compute) = self.enqueue(op, enqueue)? {
            self.side()?
                .join(compute)
                .map_err(|e| cuda_err(op, self.rank, e))?;
        }
        Ok(())
    }

    /// Enqueues `enqueue(stream)` as [`NcclComm::on_stream`] does, without ordering the compute
    /// stream after it: returns that stream when the work went to the side stream (the caller
    /// joins it), `None` when it went to the compute stream itself.
    fn enqueue(
        &self,
        op: &'static str,
        enqueue: impl FnOnce(sys::cudaStream_t) -> CommResult<()>,
    ) -> CommResult<Option<cudarc::driver::sys::CUstream>> {
        // Held for the whole call: an abort from another rank's thread waits for it (see
        // `Group::calls`); checked again under the lock so no call starts after an abort.
        let in_call = self.group.calls[self.member]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.check()?;
        if *in_call {
            return Err(CommError::Aborted { backend: BACKEND });
        }
        let r = self.rank;
        let ordinal = match self.device {
            Device::Cuda(i) => i,
            _ => 0,
        };
        let compute = compute_stream(ordinal).map_err(|e| CommError::Backend {
            backend: "CUDA",
            op,
            rank: r,
            message: e.to_string(),
        })?;
        if !use_side_stream() {
            enqueue(compute as sys::cudaStream_t)?;
            return Ok(None);
        }
        let side = self.side()?;
        side.fork(compute).map_err(|e| cuda_err(op, r, e))?;
        enqueue(side.stream as sys::cudaStream_t)?;
        Ok(Some(compute))
    }

    /// Enqueues `enqueue(stream)` as [`NcclComm::enqueue`] does and returns the [`Pending`] that
    /// orders the compute stream after it, holding `held` (the tensors the work reads and
    /// writes) until then; complete already where the work went to the compute stream.
    fn start<'a>(
        &'a self,
        op: &'static str,
        held: Vec<Tensor>,
        enqueue: impl FnOnce(sys::cudaStream_t) -> CommResult<()>,
    ) -> CommResult<Pending<'a>> {
        let Some(compute) = self.enqueue(op, enqueue)? else {
            return Ok(Pending::done()); // on the compute stream: ordered already
        };
        let mark = self.side()?.mark().map_err(|e| cuda_err(op, self.rank, e))?;
        // Held until the compute stream is ordered after the exchange (see `Pending`).
        Ok(Pending::new(move || {
            let r = self
                .side()?
                .join_marked(compute, mark)
                .map_err(|e| cuda_err(op, self.rank, e));
            drop(held);
            r
        }))
    }

    /// An `all_to_all_into` ready to enqueue: its inputs checked and contiguous, its pieces per
    /// peer, how it goes over NCCL ([`NcclComm::collective_runs`]) and, on the grouped path, this
    /// rank's own pieces copied on the compute stream (before the fork; `ncclAlltoAll` moves
    /// them itself).
    fn prepare_into(&self, inputs: &[Tensor], outputs: &[Tensor]) -> CommResult<IntoPlan> {
        self.check()?;
        let m = super::comm::chunks_per_peer("all_to_all_into", self.size, inputs, outputs)?;
        let ins = inputs
            .iter()
            .map(|t| self.contiguous_on_device(t, "all_to_all_into"))
            .collect::<CommResult<Vec<_>>>()?;
        for (i, (a, b)) in ins.iter().zip(outputs).enumerate() {
            if b.device() != self.device
                || a.kind() != b.kind()
                || !b.is_contiguous()
                || (i / m == self.rank && a.size() != b.size())
            {
                return Err(CommError::Usage {
                    op: "all_to_all_into",
                    message: format!(
                        "chunk {i}: {:?} {:?} into {:?} {:?} on {:?}",
                        a.size(),
                        a.kind(),
                        b.size(),
                        b.kind(),
                        b.device()
                    ),
                });
            }
        }
        let runs = self.collective_runs(&ins, outputs, m);
        if runs.is_none() {
            for c in 0..m {
                let i = self.rank * m + c;
                outputs[i].shallow_clone().f_copy_(&ins[i])?;
            }
        }
        Ok(IntoPlan { ins, m, runs })
    }

    /// With [`AllToAll::Collective`], where every chunk's pieces lie as one `ncclAlltoAll`
    /// wants them: for each chunk `c`, its `size` inputs (one per peer) back to back in one
    /// buffer, equally long and not empty, and the same for its outputs. Returns `(send, recv,
    /// count)` per chunk, or `None` (off, or uneven slices: the grouped sends and receives).
    fn collective_runs(
        &self,
        ins: &[Tensor],
        outputs: &[Tensor],
        m: usize,
    ) -> Option<Vec<(usize, usize, usize)>> {
        if self.a2a.get() != AllToAll::Collective {
            return None;
        }
        let mut runs = Vec::with_capacity(m);
        for c in 0..m {
            let (i0, o0) = (&ins[c], &outputs[c]);
            let count = i0.numel();
            let bytes = count * i0.kind().elt_size_in_bytes();
            let (ib, ob) = (i0.data_ptr() as usize, o0.data_ptr() as usize);
            for j in 0..self.size {
                let (a, b) = (&ins[j * m + c], &outputs[j * m + c]);
                if count == 0
                    || a.numel() != count
                    || b.numel() != count
                    || a.data_ptr() as usize != ib + j * bytes
                    || b.data_ptr() as usize != ob + j * bytes
                {
                    return None;
                }
            }
            runs.push((ib, ob, count));
        }
        Some(runs)
    }

    /// The exchange of a prepared `all_to_all_into` on `st`: one `ncclAlltoAll` per chunk where
    /// [`NcclComm::collective_runs`] allowed, else grouped sends and receives of the peers'
    /// pieces (the own ones were copied by [`NcclComm::prepare_into`]).
    fn exchange_into(&self, plan: &IntoPlan, outputs: &[Tensor], st: sys::cudaStream_t) -> CommResult<()> {
        let (ins, m) = (&plan.ins, plan.m);
        if let Some(runs) = &plan.runs {
            let dt = dtype(ins[0].kind(), "all_to_all_into")?;
            return self.grouped("all_to_all_into", || {
                for (send, recv, count) in runs {
                    // SAFETY: `send` / `recv` start `size` back-to-back pieces of `count` elements
                    // in contiguous tensors on this device (checked by `collective_runs`), kept
                    // alive by the caller until the stream has consumed them.
                    unsafe {
                        sys::ncclAlltoAll(
                            *send as *const c_void,
                            *recv as *mut c_void,
                            *count,
                            dt,
                            self.comm.0,
                            st,
                        )
                    }
                    .result()
                    .map_err(|e| backend_err("all_to_all_into", self.rank, e))?;
                }
                Ok(())
            });
        }
        self.grouped("all_to_all_into", || {
            for j in (0..self.size).filter(|&j| j != self.rank) {
                for c in 0..m {
                    let i = j * m + c;
                    if ins[i].numel() > 0 {
                        self.send_raw(&ins[i], j, st)?;
                    }
                    if outputs[i].numel() > 0 {
                        self.recv_raw(&outputs[i], j, st)?;
                    }
                }
            }
            Ok(())
        })
    }

    fn empty(&self, shape: &[i64], kind: Kind) -> CommResult<Tensor> {
        Ok(Tensor::f_empty(shape, (kind, self.device))?)
    }

    /// Runs `f` between `ncclGroupStart` and `ncclGroupEnd` (point-to-point calls inside a group
    /// are matched together, so a ring of send/recv cannot deadlock).
    fn grouped(&self, op: &'static str, f: impl FnOnce() -> CommResult<()>) -> CommResult<()> {
        nccl::group_start().map_err(|e| backend_err(op, self.rank, e))?;
        let r = f();
        let end = nccl::group_end().map_err(|e| backend_err(op, self.rank, e));
        r.and(end.map(|_| ()))
    }

    fn send_raw(&self, t: &Tensor, dst: usize, st: sys::cudaStream_t) -> CommResult<()> {
        let dt = dtype(t.kind(), "send")?;
        // SAFETY: `t` is contiguous on this communicator's device and outlives the enqueue; the
        // caching allocator does not reuse its memory before the stream has consumed it.
        unsafe {
            nccl::send(
                t.data_ptr() as *const c_void,
                t.numel(),
                dt,
                dst as i32,
                self.comm.0,
                st,
            )
        }
        .map(|_| ())
        .map_err(|e| backend_err("send", self.rank, e))
    }

    fn recv_raw(&self, out: &Tensor, src: usize, st: sys::cudaStream_t) -> CommResult<()> {
        let dt = dtype(out.kind(), "recv")?;
        // SAFETY: `out` is a contiguous buffer (or a contiguous view into one) on this device, large
        // enough for the message.
        unsafe { nccl::recv(out.data_ptr(), out.numel(), dt, src as i32, self.comm.0, st) }
            .map(|_| ())
            .map_err(|e| backend_err("recv", self.rank, e))
    }

    /// `t` to `dst` and `out` from `src` as one NCCL group (a ring of them cannot deadlock).
    fn send_recv_raw(
        &self,
        op: &'static str,
        (t, dst): (&Tensor, usize),
        (out, src): (&Tensor, usize),
        st: sys::cudaStream_t,
    ) -> CommResult<()> {
        self.grouped(op, || {
            self.send_raw(t, dst, st)?;
            self.recv_raw(out, src, st)
        })
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn is_aborted(&self) -> bool {
        self.group.aborted.load(Ordering::SeqCst)
    }

    fn capturable(&self) -> bool {
        true
    }

    fn abort_handle(&self) -> super::comm::AbortHandle {
        let (group, rank) = (self.group.clone(), self.rank);
        Arc::new(move || {
            if !group.aborted.swap(true, Ordering::SeqCst) {
                tracing::warn!(rank, "aborting NCCL group (watchdog)");
                group.abort_all(rank);
            }
        })
    }

    fn size(&self) -> usize {
        self.size
    }

    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn device(&self) -> Device {
        self.device
    }

    fn all_to_all(&self, inputs: &[Tensor], out_shapes: &[Vec<i64>]) -> CommResult<Vec<Tensor>> {
        self.check()?;
        super::comm::check_all_to_all(self.size, inputs, out_shapes)?;
        let kind = inputs[0].kind();
        let ins = inputs
            .iter()
            .map(|t| self.contiguous_on_device(t, "all_to_all"))
            .collect::<CommResult<Vec<_>>>()?;
        let mut outs = Vec::with_capacity(self.size);
        for (j, shape) in out_shapes.iter().enumerate() {
            outs.push(if j == self.rank {
                ins[j].shallow_clone()
            } else {
                self.empty(shape, kind)?
            });
        }
        self.on_stream("all_to_all", |st| {
            self.grouped("all_to_all", || {
                for j in (0..self.size).filter(|&j| j != self.rank) {
                    if ins[j].numel() > 0 {
                        self.send_raw(&ins[j], j, st)?;
                    }
                    if outs[j].numel() > 0 {
                        self.recv_raw(&outs[j], j, st)?;
                    }
                }
                Ok(())
            })
        })?;
        Ok(outs)
    }

    fn all_to_all_into(&self, inputs: &[Tensor], outputs: &[Tensor]) -> CommResult<()> {
        let plan = self.prepare_into(inputs, outputs)?;
        self.on_stream("all_to_all_into", |st| self.exchange_into(&plan, outputs, st))
    }

    fn start_all_to_all_into<'a>(&'a self, inputs: &[Tensor], outputs: &[Tensor]) -> CommResult<Pending<'a>> {
        let plan = self.prepare_into(inputs, outputs)?;
        let held = plan
            .ins
            .iter()
            .chain(outputs)
            .map(Tensor::shallow_clone)
            .collect();
        self.start("start_all_to_all_into", held, |st| {
            self.exchange_into(&plan, outputs, st)
        })
    }

    fn all_gather(&self, t: &Tensor) -> CommResult<Vec<Tensor>> {
        self.check()?;
        let t = self.contiguous_on_device(t, "all_gather")?;
        let dt = dtype(t.kind(), "all_gather")?;
        let mut shape = vec![self.size as i64];
        shape.extend(t.size());
        let out = self.empty(&shape, t.kind())?;
        self.on_stream("all_gather", |st| {
            // SAFETY: `out` holds `size` contiguous copies of `t`'s element count.
            unsafe {
                nccl::all_gather(
                    t.data_ptr() as *const c_void,
                    out.data_ptr(),
                    t.numel(),
                    dt,
                    self.comm.0,
                    st,
                )
            }
            .map(|_| ())
            .map_err(|e| backend_err("all_gather", self.rank, e))
        })?;
        Ok((0..self.size as i64).map(|i| out.get(i)).collect())
    }

    fn all_reduce_sum(&self, t: &Tensor) -> CommResult<Tensor> {
        self.check()?;
        let t = self.contiguous_on_device(t, "all_reduce")?;
        let dt = dtype(t.kind(), "all_reduce")?;
        let out = self.empty(&t.size(), t.kind())?;
        self.on_stream("all_reduce", |st| {
            // SAFETY: `t` and `out` are contiguous buffers of the same element count on this device.
            unsafe {
                nccl::all_reduce(
                    t.data_ptr() as *const c_void,
                    out.data_ptr(),
                    t.numel(),
                    dt,
                    sys::ncclRedOp_t::ncclSum,
                    self.comm.0,
                    st,
                )
            }
            .map(|_| ())
            .map_err(|e| backend_err("all_reduce", self.rank, e))
        })?;
        Ok(out)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> CommResult<Tensor> {
        self.check()?;
        let t = self.contiguous_on_device(t, "broadcast")?;
        let dt = dtype(t.kind(), "broadcast")?;
        let out = self.empty(&t.size(), t.kind())?;
        self.on_stream("broadcast", |st| {
            // SAFETY: as for all_reduce; the root's `t` is the source, every rank's `out` the target.
            unsafe {
                nccl::broadcast(
                    t.data_ptr() as *const c_void,
                    out.data_ptr(),
                    t.numel(),
                    dt,
                    root as i32,
                    self.comm.0,
                    st,
                )
            }
            .map(|_| ())
            .map_err(|e| backend_err("broadcast", self.rank, e))
        })?;
        Ok(out)
    }

    fn send(&self, t: &Tensor, dst: usize) -> CommResult<()> {
        self.check()?;
        let t = self.contiguous_on_device(t, "send")?;
        self.on_stream("send", |st| self.send_raw(&t, dst, st))
    }

    fn recv(&self, shape: &[i64], kind: Kind, src: usize) -> CommResult<Tensor> {
        self.check()?;
        let out = self.empty(shape, kind)?;
        self.on_stream("recv", |st| self.recv_raw(&out, src, st))?;
        Ok(out)
    }

    fn send_recv(&self, t: &Tensor, dst: usize, shape: &[i64], kind: Kind, src: usize) -> CommResult<Tensor> {
        self.check()?;
        let t = self.contiguous_on_device(t, "send_recv")?;
        let out = self.empty(shape, kind)?;
        self.on_stream("send_recv", |st| {
            self.send_recv_raw("send_recv", (&t, dst), (&out, src), st)
        })?;
        Ok(out)
    }

    fn start_send_recv<'a>(
        &'a self,
        t: &Tensor,
        dst: usize,
        shape: &[i64],
        kind: Kind,
        src: usize,
    ) -> CommResult<(Tensor, Pending<'a>)> {
        let op = "start_send_recv";
        self.check()?;
        let t = self.contiguous_on_device(t, op)?;
        let out = self.empty(shape, kind)?;
        let held = vec![t.shallow_clone(), out.shallow_clone()];
        let pending = self.start(op, held, |st| self.send_recv_raw(op, (&t, dst), (&out, src), st))?;
        Ok((out, pending))
    }

    fn barrier(&self) -> CommResult<()> {
        let one = Tensor::f_ones([1], (Kind::Float, self.device))?;
        let s = self.all_reduce_sum(&one)?;
        // Wait on the host for the reduction (and everything before it on the stream).
        let _ = s.f_to_device(Device::Cpu)?;
        Ok(())
    }

    /// Aborts every member's communicator (releasing kernels stuck waiting for a dead peer);
    /// later calls on any member fail with [`CommError::Aborted`].
    fn abort(&self) {
        if self.group.aborted.swap(true, Ordering::SeqCst) {
            return;
        }
        tracing::warn!(rank = self.rank, size = self.size, "aborting NCCL group");
        self.group.abort_all(self.rank);
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        let mut released = self.group.calls[self.member]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if self.comm.0.is_null() || *released {
            return;
        }
        *released = true;
        let aborted = self.group.aborted.load(Ordering::SeqCst);
        // SAFETY: the handle came from NCCL and was not released yet (checked and marked under
        // its lock, which an abort also takes): destroyed or aborted exactly once.
        let r = unsafe {
            if aborted {
                nccl::comm_abort(self.comm.0)
            } else {
                nccl::comm_destroy(self.comm.0)
            }
        };
        if let Err(e) = r {
            tracing::warn!(rank = self.rank, error = ?e.0, "releasing the NCCL communicator failed");
        }
    }
}

/// Creates NCCL groups on this node; global rank `i` computes on CUDA device `devices[i]`.
#[derive(Debug, Clone)]
pub struct NcclFactory {
    pub devices: Vec<i32>,
}

impl NcclFactory {
    /// For ranks on `devices` (all CUDA); a non-CUDA device is refused.
    pub fn from_devices(devices: &[Device]) -> CommResult<Self> {
        let devices = devices
            .iter()
            .map(|d| match d {
                Device::Cuda(i) => Ok(*i as i32),
                other => Err(CommError::Usage {
                    op: "group",
                    message: format!("NCCL ranks need CUDA devices, got {other:?}"),
                }),
            })
            .collect::<CommResult<Vec<_>>>()?;
        Ok(Self { devices })
    }
}

impl CommFactory for NcclFactory {
    fn group(&self, members: &[usize]) -> CommResult<Vec<Box<dyn Communicator>>> {
        let devs = members
            .iter()
            .map(|&m| {
                self.devices.get(m).copied().ok_or_else(|| CommError::Usage {
                    op: "group",
                    message: format!("rank {m} has no device (node has {:?})", self.devices),
                })
            })
            .collect::<CommResult<Vec<_>>>()?;
        Ok(NcclComm::init_all(&devs)?
            .into_iter()
            .map(|c| Box::new(c) as Box<dyn Communicator>)
            .collect())
    }
}

/// The CUDA device's product name (`NVIDIA H200`), where the driver loads and answers.
pub fn cuda_product_name(ordinal: usize) -> Option<String> {
    // cudarc's dynamic loading panics when libcuda is missing.
    std::panic::catch_unwind(|| cudarc::driver::CudaContext::new(ordinal).ok()?.name().ok())
        .ok()
        .flatten()
}
