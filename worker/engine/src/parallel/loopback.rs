//! A stand-in for the peers of one rank: [`LoopbackComm`] is rank 0 of a group of `n` whose
//! other members do not exist. Every collective returns tensors of the shapes a real group
//! would return, filled from this rank's own data (a copy of what it sends where the shapes
//! match, zeros where they do not), and nothing crosses an interconnect.
//!
//! What it is for: measuring ONE rank's share of a plan on one GPU (`flux_bench --sim-plan`).
//! A rank of `ulysses=4` at 1024² runs its linear layers on a quarter of the tokens and its
//! attention on a quarter of the heads over all tokens, plus the local copies an all-to-all
//! makes; that is the floor under the plan's step time on four GPUs, with the interconnect's
//! cost (and the ranks waiting for each other) left out. The values it produces are not the
//! plan's result: never serve an image with it.
//!
//! A started all-to-all ([`Communicator::start_all_to_all_into`]) on a CUDA device makes its
//! copies on a side stream ordered with the compute stream by events, as NCCL runs there, so the
//! overlap of exchanges with compute (and its fork/join inside a captured step) runs on one GPU
//! too; the copies then take the copy engines, where NCCL's kernels take SMs and NVLink.
#![allow(unsafe_code)] // device copies on the side stream: every unsafe block states what it relies on.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tch::{Device, Kind, Tensor};

use super::comm::{AbortHandle, CommError, CommResult, Communicator, Pending};
use super::stream::{SideStream, compute_stream};

const BACKEND: &str = "loopback";

/// Rank 0 of a group of `n` with no peers (see the module docs).
pub struct LoopbackComm {
    n: usize,
    device: Device,
    aborted: Arc<AtomicBool>,
    /// For started exchanges on CUDA; created on first use.
    side: std::cell::OnceCell<SideStream>,
}

impl std::fmt::Debug for LoopbackComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LoopbackComm(0/{} on {:?})", self.n, self.device)
    }
}

impl Clone for LoopbackComm {
    /// The same group (an abort of one is an abort of both), with a side stream of its own.
    fn clone(&self) -> Self {
        Self {
            n: self.n,
            device: self.device,
            aborted: self.aborted.clone(),
            side: std::cell::OnceCell::new(),
        }
    }
}

impl LoopbackComm {
    pub fn new(n: usize, device: Device) -> Self {
        Self {
            n: n.max(1),
            device,
            aborted: Arc::new(AtomicBool::new(false)),
            side: std::cell::OnceCell::new(),
        }
    }

    fn side(&self) -> CommResult<&SideStream> {
        if let Some(s) = self.side.get() {
            return Ok(s);
        }
        let s = SideStream::new().map_err(|e| cuda_err("stream", e))?;
        Ok(self.side.get_or_init(|| s))
    }

    /// Copies each `(src, dst)` pair (contiguous, same size, on this device) on the side stream
    /// after the compute stream's work so far; the returned [`Pending`] orders the compute
    /// stream after the copies and holds `held` until then.
    fn copies_on_side<'a>(
        &'a self,
        op: &'static str,
        ordinal: usize,
        pairs: &[(&Tensor, &Tensor)],
        held: Vec<Tensor>,
    ) -> CommResult<Pending<'a>> {
        let compute = compute_stream(ordinal)?;
        let side = self.side()?;
        side.fork(compute).map_err(|e| cuda_err(op, e))?;
        for (t, o) in pairs {
            let bytes = t.numel() * t.kind().elt_size_in_bytes();
            if bytes == 0 {
                continue;
            }
            // SAFETY: both tensors are contiguous on this device with at least `bytes` bytes, and
            // stay alive (in `held`) until the compute stream is ordered after the copy.
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    o.data_ptr() as u64,
                    t.data_ptr() as u64,
                    bytes,
                    side.stream,
                )
            }
            .map_err(|e| cuda_err(op, e))?;
        }
        let mark = side.mark().map_err(|e| cuda_err(op, e))?;
        Ok(Pending::new(move || {
            let r = side.join_marked(compute, mark).map_err(|e| cuda_err(op, e));
            drop(held);
            r
        }))
    }

    fn check(&self) -> CommResult<()> {
        if self.aborted.load(Ordering::SeqCst) {
            return Err(CommError::Aborted { backend: BACKEND });
        }
        Ok(())
    }

    /// A tensor of `shape` standing for what a peer would send: a copy of `like` when it has
    /// as many elements (so the bytes moved match a real exchange's local copy), zeros otherwise.
    fn standin(&self, like: &Tensor, shape: &[i64], kind: Kind) -> CommResult<Tensor> {
        if fits(like, shape, kind) {
            Ok(like.f_reshape(shape)?.f_to_device(self.device)?.f_detach_copy()?)
        } else {
            Ok(Tensor::f_zeros(shape, (kind, self.device))?)
        }
    }
}

impl Communicator for LoopbackComm {
    fn rank(&self) -> usize {
        0
    }

    fn size(&self) -> usize {
        self.n
    }

    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn device(&self) -> Device {
        self.device
    }

    fn all_to_all(&self, inputs: &[Tensor], out_shapes: &[Vec<i64>]) -> CommResult<Vec<Tensor>> {
        self.check()?;
        super::comm::check_all_to_all(self.n, inputs, out_shapes)?;
        inputs
            .iter()
            .zip(out_shapes)
            .map(|(t, s)| self.standin(t, s, t.kind()))
            .collect()
    }

    fn all_to_all_into(&self, inputs: &[Tensor], outputs: &[Tensor]) -> CommResult<()> {
        self.check()?;
        let m = super::comm::chunks_per_peer("all_to_all_into", self.n, inputs, outputs)?;
        // One copy per chunk, as a real exchange moves each chunk once (only the own chunks with
        // `DITFLEET_LOOPBACK_COPIES=own`).
        for (i, (t, o)) in inputs.iter().zip(outputs).enumerate() {
            if own_copies_only() && i >= m {
                continue;
            }
            let mut o = o.shallow_clone();
            if fits(t, &o.size(), o.kind()) {
                o.f_copy_(&t.f_reshape(o.size())?)?;
            } else {
                let _ = o.f_zero_()?;
            }
        }
        Ok(())
    }

    fn start_all_to_all_into<'a>(&'a self, inputs: &[Tensor], outputs: &[Tensor]) -> CommResult<Pending<'a>> {
        let op = "start_all_to_all_into";
        let Device::Cuda(ordinal) = self.device else {
            self.all_to_all_into(inputs, outputs)?;
            return Ok(Pending::done());
        };
        self.check()?;
        let m = super::comm::chunks_per_peer(op, self.n, inputs, outputs)?;
        let ins = inputs
            .iter()
            .map(|t| t.f_contiguous())
            .collect::<Result<Vec<_>, _>>()?;
        for (i, (t, o)) in ins.iter().zip(outputs).enumerate() {
            if t.device() != self.device || o.device() != self.device || !o.is_contiguous() {
                return Err(CommError::Usage {
                    op,
                    message: format!("chunk {i}: outputs must be contiguous on {:?}", self.device),
                });
            }
        }
        // As the blocking exchange: zeros where a chunk's shape does not match (on the compute
        // stream, before the fork).
        let same = |t: &Tensor, o: &Tensor| fits(t, &o.size(), o.kind());
        for (t, o) in ins.iter().zip(outputs) {
            if !same(t, o) {
                let _ = o.shallow_clone().f_zero_()?;
            }
        }
        let pairs: Vec<(&Tensor, &Tensor)> = ins
            .iter()
            .zip(outputs)
            .enumerate()
            .filter(|(i, (t, o))| same(t, o) && !(own_copies_only() && *i >= m))
            .map(|(_, p)| p)
            .collect();
        let held: Vec<Tensor> = ins.iter().chain(outputs).map(Tensor::shallow_clone).collect();
        self.copies_on_side(op, ordinal, &pairs, held)
    }

    fn start_send_recv<'a>(
        &'a self,
        t: &Tensor,
        dst: usize,
        shape: &[i64],
        kind: Kind,
        src: usize,
    ) -> CommResult<(Tensor, Pending<'a>)> {
        // The stand-in copy goes to the side stream where the blocking exchange would copy.
        let copies = fits(t, shape, kind) && t.device() == self.device && !own_copies_only();
        let (Device::Cuda(ordinal), true) = (self.device, copies) else {
            return Ok((self.send_recv(t, dst, shape, kind, src)?, Pending::done()));
        };
        self.check()?;
        let t = t.f_contiguous()?;
        let out = Tensor::f_empty(shape, (kind, self.device))?;
        let held = vec![t.shallow_clone(), out.shallow_clone()];
        let pending = self.copies_on_side("start_send_recv", ordinal, &[(&t, &out)], held)?;
        Ok((out, pending))
    }

    fn all_gather(&self, t: &Tensor) -> CommResult<Vec<Tensor>> {
        self.check()?;
        (0..self.n)
            .map(|_| self.standin(t, &t.size(), t.kind()))
            .collect()
    }

    fn all_reduce_sum(&self, t: &Tensor) -> CommResult<Tensor> {
        self.check()?;
        Ok(t.f_mul_scalar(self.n as f64)?)
    }

    fn broadcast(&self, t: &Tensor, _root: usize) -> CommResult<Tensor> {
        self.check()?;
        self.standin(t, &t.size(), t.kind())
    }

    fn send(&self, _t: &Tensor, _dst: usize) -> CommResult<()> {
        self.check()
    }

    fn recv(&self, shape: &[i64], kind: Kind, _src: usize) -> CommResult<Tensor> {
        self.check()?;
        Ok(Tensor::f_zeros(shape, (kind, self.device))?)
    }

    fn send_recv(
        &self,
        t: &Tensor,
        _dst: usize,
        shape: &[i64],
        kind: Kind,
        _src: usize,
    ) -> CommResult<Tensor> {
        self.check()?;
        if own_copies_only() && fits(t, shape, kind) && t.device() == self.device {
            // What a real rank's compute stream does for a point-to-point exchange: nothing (NCCL
            // moves the bytes); the received block is this rank's own, which Ring only reads.
            return Ok(t.f_reshape(shape)?);
        }
        self.standin(t, shape, kind)
    }

    fn barrier(&self) -> CommResult<()> {
        self.check()
    }

    fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
    }

    fn abort_handle(&self) -> AbortHandle {
        let a = self.aborted.clone();
        Arc::new(move || a.store(true, Ordering::SeqCst))
    }

    fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::SeqCst)
    }

    fn capturable(&self) -> bool {
        true
    }
}

/// `DITFLEET_LOOPBACK_COPIES=own`: the all-to-alls copy only the rank's own pieces (what a rank
/// copies itself on the grouped NCCL path) and leave the peers' pieces as they were, so a share
/// measures the rank's compute floor without the stand-in exchange's copies (default `all`: one
/// copy per piece). The values are then further from any real result; timing only.
fn own_copies_only() -> bool {
    crate::settings::bench().loopback_own_copies
}

/// Whether `t` has the element count and kind of a `shape` `kind` tensor (a stand-in can then
/// be a copy of it).
fn fits(t: &Tensor, shape: &[i64], kind: Kind) -> bool {
    t.numel() as i64 == shape.iter().product::<i64>() && t.kind() == kind
}

fn cuda_err(op: &'static str, e: cudarc::driver::DriverError) -> CommError {
    CommError::Backend {
        backend: "CUDA",
        op,
        rank: 0,
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::attention::JointAttention;
    use crate::parallel::attention::{SeqLayout, UspAttention};

    /// The loopback group returns the shapes a real group of 4 returns, so one rank's share of
    /// a plan runs end to end on one device (the values are not the plan's).
    #[test]
    fn one_rank_of_ulysses_and_ring_runs_with_loopback_peers_and_keeps_its_shapes() {
        let (b, h, d) = (1, 8, 16);
        for (u, r) in [(4, 1), (1, 4), (2, 2)] {
            let layout = SeqLayout::new(u * r, 8, 64, None);
            let local = layout.local_len(0);
            let uly = LoopbackComm::new(u, Device::Cpu);
            let ring = LoopbackComm::new(r, Device::Cpu);
            let op = UspAttention {
                ulysses: &uly,
                ring: &ring,
                layout: &layout,
            };
            let q = Tensor::randn([b, h, local, d], (Kind::Float, Device::Cpu));
            let o = op.attend(&q, &q.randn_like(), &q.randn_like()).unwrap();
            assert_eq!(o.size(), vec![b, h, local, d], "u={u} r={r}");
            assert!(bool::try_from(o.isfinite().all()).unwrap());
        }
    }

    #[test]
    fn an_aborted_loopback_group_fails_its_collectives() {
        let c = LoopbackComm::new(2, Device::Cpu);
        (c.abort_handle())();
        let t = Tensor::zeros([2], (Kind::Float, Device::Cpu));
        assert!(matches!(c.all_gather(&t), Err(CommError::Aborted { .. })));
    }
}
