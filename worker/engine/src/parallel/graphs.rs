//! CUDA graphs of one denoising step's transformer forward, for the ranks of a multi-GPU plan.
//!
//! Split over N GPUs, a step's GPU work shrinks N-fold but the host still launches every kernel
//! of the forward (and, for Ulysses, two all-to-alls per block: 114 per step for Flux): launching
//! took 32.7 ms of a 60.0 ms Ulysses-4 step at 1024² (nvidia-h200-x4,
//! bench/parallel/results/h200x4-run1), so more GPUs stop paying. A graph launches the
//! whole captured forward, NCCL collectives included (NCCL supports stream capture), in one call.
//!
//! Per rank and per [`StepKey`] (the rank's token slices and the latent size: everything the
//! captured RoPE tables and shapes depend on), the first step of the first job runs the forward
//! eagerly on a side stream (its output is that step's result; it also warms cuBLAS/cuDNN for the
//! stream), then captures it; later steps copy their inputs into the graph's static inputs and
//! replay it. Every rank of a group takes the same decisions in the same order (same key, same
//! cache policy), so their collectives stay matched.
//!
//! The captured kernels read the weights, the static inputs and the captured RoPE tables by
//! address and use the communicators: the cache is emptied before the communicators change or
//! go (see `runner::rank_loop`). A capture that fails disables graphs for the process
//! ([`take_capture_failure`] lets the driver rerun the job eagerly on rebuilt communicators).
//!
//! `DITFLEET_CUDA_GRAPHS=on|all|off` (default `on`: plans without Ring; `all`: Ring plans too),
//! `DITFLEET_CUDA_GRAPHS_MAX` graphs kept per rank (default 2; each holds its own activation
//! memory pool).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};

use tch::{Device, Tensor};

use crate::aten::CudaGraph;
use crate::nn::Res;

static DISABLED: AtomicBool = AtomicBool::new(false);
static FAILED: AtomicBool = AtomicBool::new(false);

/// `DITFLEET_CUDA_GRAPHS`: `on` (default: plans without Ring), `all` (Ring too), `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Off,
    NoRing,
    All,
}

fn mode() -> Mode {
    match crate::settings::get().cuda_graphs {
        crate::settings::CudaGraphs::Off => Mode::Off,
        crate::settings::CudaGraphs::All => Mode::All,
        crate::settings::CudaGraphs::NoRing => Mode::NoRing,
    }
}

/// Whether the steps of a multi-GPU plan with Ring degree `ring` run as CUDA graphs on `device`.
/// Ring plans stay eager by default: on 4 H200s their graphs were slower than eager launches
/// (ring=4 at 1024²: 87.8 vs 80.5 ms/step, bench/parallel/results/h200x4-run1).
pub fn enabled(device: Device, ring: usize) -> bool {
    let m = mode();
    let plan_ok = match m {
        Mode::Off => false,
        Mode::NoRing => ring == 1,
        Mode::All => true,
    };
    plan_ok && device.is_cuda() && crate::aten::has_cuda() && !DISABLED.load(Ordering::SeqCst)
}

/// True once after a capture failed (graphs are off from then on): the caller reruns the job.
pub fn take_capture_failure() -> bool {
    FAILED.swap(false, Ordering::SeqCst)
}

fn max_graphs() -> usize {
    crate::settings::get().cuda_graphs_max
}

/// What a captured step depends on besides its input values: the shapes, slices and positions
/// the model's forward bakes into its kernels, as the model family lists them (Flux: its text and
/// image token slices, the whole text length and the latent size).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StepKey(pub Vec<i64>);

/// A new tensor with `t`'s values (on the current stream).
fn deep_copy(t: &Tensor) -> Res<Tensor> {
    let mut c = t.f_empty_like()?;
    c.f_copy_(t)?;
    Ok(c)
}

/// One captured forward and its static tensors.
pub struct StepGraph {
    graph: CudaGraph,
    /// Static copies of the per-step inputs: each replay copies the step's values in.
    inputs: Vec<Tensor>,
    out: Tensor,
    /// Tensors the captured kernels read that do not change between jobs with this key (e.g.
    /// RoPE tables): kept alive with the graph.
    _held: Vec<Tensor>,
}

/// The forward a graph captures: the per-step inputs -> the output.
pub type Forward<'a> = dyn Fn(&[Tensor]) -> Res<Tensor> + 'a;

impl StepGraph {
    /// Runs `forward` eagerly on a side stream (its result is returned: this step's output) and
    /// captures it into a graph on the same static inputs.
    fn capture(
        ordinal: usize,
        inputs: &[&Tensor],
        held: &[&Tensor],
        forward: &Forward<'_>,
    ) -> Res<(Self, Tensor)> {
        let mut graph = CudaGraph::new(ordinal)?;
        graph.enter()?;
        let captured = (|| {
            let statics = inputs.iter().map(|t| deep_copy(t)).collect::<Res<Vec<_>>>()?;
            let first = forward(&statics)?;
            graph.begin()?;
            let out = forward(&statics);
            let end = graph.end();
            let out = out?;
            end?;
            Ok::<_, tch::TchError>((statics, out, first))
        })();
        graph.exit()?;
        let (inputs, out, first) = captured?;
        Ok((
            Self {
                graph,
                inputs,
                out,
                _held: held.iter().map(|t| t.shallow_clone()).collect(),
            },
            first,
        ))
    }

    /// Copies the inputs into the static tensors, replays, returns a copy of the output.
    fn run(&self, inputs: &[&Tensor]) -> Res<Tensor> {
        for (s, t) in self.inputs.iter().zip(inputs) {
            s.shallow_clone().f_copy_(t)?;
        }
        self.graph.replay()?;
        deep_copy(&self.out)
    }
}

/// A rank's captured steps, most recently used last.
pub struct GraphCache {
    entries: VecDeque<(StepKey, StepGraph)>,
    cap: usize,
    /// Steps run by replay / captures made (for the bench and tests).
    pub replays: u64,
    pub captures: u64,
}

impl Default for GraphCache {
    fn default() -> Self {
        Self {
            entries: VecDeque::new(),
            cap: max_graphs().max(1),
            replays: 0,
            captures: 0,
        }
    }
}

impl GraphCache {
    /// Drops every graph (before the communicators they captured change).
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The step's output for `inputs`: by replaying the graph of `key`, or by capturing it first
    /// (evicting the least recently used beyond the cap). `held`: what the forward reads besides
    /// its inputs and weights (kept alive with the graph).
    pub fn step(
        &mut self,
        ordinal: usize,
        key: &StepKey,
        inputs: &[&Tensor],
        held: &[&Tensor],
        forward: &Forward<'_>,
    ) -> Res<Tensor> {
        if let Some(i) = self.entries.iter().position(|(k, _)| k == key) {
            let entry = self.entries.remove(i).expect("index from position");
            let out = entry.1.run(inputs);
            self.entries.push_back(entry);
            self.replays += 1;
            return out;
        }
        while self.entries.len() >= self.cap {
            self.entries.pop_front();
        }
        match StepGraph::capture(ordinal, inputs, held, forward) {
            Ok((g, first)) => {
                self.entries.push_back((key.clone(), g));
                self.captures += 1;
                tracing::info!(
                    ordinal,
                    ?key,
                    graphs = self.entries.len(),
                    "captured a CUDA graph of the step"
                );
                Ok(first)
            }
            Err(e) => {
                if !DISABLED.swap(true, Ordering::SeqCst) {
                    FAILED.store(true, Ordering::SeqCst);
                }
                tracing::warn!(ordinal, error = %e, "CUDA graph capture failed: steps run eagerly from now on");
                Err(tch::TchError::Torch(format!(
                    "CUDA graph capture failed (graphs now off): {e}"
                )))
            }
        }
    }
}
