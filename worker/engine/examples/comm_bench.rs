//! NCCL all-to-all check and overlap timing, one thread per GPU (any count, 1 included).
//!
//! ```text
//! comm_bench --devices 0,1,2,3 [--rows 4608] [--iters 30]
//! ```
//!
//! 1. **Check** (small tensors, every rank): the Ulysses exchange of
//!    [`Communicator::all_to_all_into`] as the attention calls it (three pieces per peer, q/k/v
//!    head groups into token ranges), with each [`AllToAll`] mode (grouped send/recv, and one
//!    `ncclAlltoAll` per piece), blocking and started ([`Communicator::start_all_to_all_into`]
//!    with a matmul enqueued before the wait), eager and captured in a CUDA graph then replayed
//!    with new inputs. Every received piece must hold exactly what its peer sent.
//! 2. **Timing** (bf16, Flux.1-dev shapes: `rows` joint tokens over the group, 24 heads of 128,
//!    the single block's MLP-in matmul `(rows / n, 3072) x (3072, 12288)` as the overlapped
//!    work): per mode, the exchange alone, the matmul alone, and started exchange + matmul +
//!    wait, each the median of `iters` graph replays; "hidden" = how much of the exchange the
//!    overlap hid.
//!
//! 3. **Ring** (the K/V block Ring attention passes on): [`Communicator::send_recv`] to the next
//!    rank from the previous one, blocking and started ([`Communicator::start_send_recv`] with a
//!    matmul before the wait), eager and graph-replayed with new inputs, checked exactly; then
//!    timed at a Flux.1-dev block `(2, 1, rows / n, 24, 128)` bf16 the same way as 2.
//!
//! One JSON line per rank and row on stdout; exits non-zero if any check failed. On one GPU the
//! group has one rank: the exchange is the rank's own piece, so this checks the plumbing (side
//! stream, events, capture), not the interconnect.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use ditfleet_engine::aten::CudaGraph;
use ditfleet_engine::parallel::nccl::{self, AllToAll};
use ditfleet_engine::parallel::{Communicator, NcclComm};
use tch::{Device, Kind, Tensor};

struct Args {
    devices: Vec<i32>,
    rows: i64,
    iters: usize,
}

fn parse() -> Result<Args> {
    let mut a = Args {
        devices: vec![0],
        rows: 4608,
        iters: 30,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--devices" => {
                a.devices = val()?
                    .split(',')
                    .map(|d| d.trim().parse().context("--devices: CUDA ordinals"))
                    .collect::<Result<_>>()?
            }
            "--rows" => a.rows = val()?.parse()?,
            "--iters" => a.iters = val()?.parse()?,
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(a)
}

/// One exchange as `UspAttention::attend_groups` makes it: `send` q/k/v `(n, 1, rows, hu, d)`
/// (group `j` for peer `j`) into `recv` q/k/v `(1, n * rows, hu, d)` (peer `j`'s tokens at
/// `j * rows`).
struct Exchange {
    send: [Tensor; 3],
    recv: [Tensor; 3],
    ins: Vec<Tensor>,
    outs: Vec<Tensor>,
}

impl Exchange {
    fn new(n: i64, rows: i64, hu: i64, d: i64, kind: Kind, dev: Device) -> Self {
        let send = [0, 1, 2].map(|_| Tensor::zeros([n, 1, rows, hu, d], (kind, dev)));
        let recv = [0, 1, 2].map(|_| Tensor::zeros([1, n * rows, hu, d], (kind, dev)));
        let (mut ins, mut outs) = (Vec::new(), Vec::new());
        for j in 0..n {
            for (s, r) in send.iter().zip(&recv) {
                ins.push(s.get(j));
                outs.push(r.narrow(1, j * rows, rows));
            }
        }
        Self {
            send,
            recv,
            ins,
            outs,
        }
    }

    /// Fills what this rank sends: piece `(t, j)` = `1000 * t + 10 * rank + j + salt`.
    fn fill(&self, rank: i64, salt: f64) {
        for (t, s) in self.send.iter().enumerate() {
            for j in 0..s.size()[0] {
                let _ = s
                    .get(j)
                    .fill_(1000.0 * t as f64 + 10.0 * rank as f64 + j as f64 + salt);
            }
        }
        for r in &self.recv {
            let _ = r.shallow_clone().fill_(-1.0);
        }
    }

    /// Whether piece `(t, j)` received is what peer `j` sent this rank.
    fn verify(&self, rank: i64, n: i64, rows: i64, salt: f64) -> Result<bool> {
        for (t, r) in self.recv.iter().enumerate() {
            for j in 0..n {
                let want = 1000.0 * t as f64 + 10.0 * j as f64 + rank as f64 + salt;
                let got = r.narrow(1, j * rows, rows).to_kind(Kind::Float);
                let bad = f64::try_from((got - want).abs().max())?;
                if bad != 0.0 {
                    eprintln!("rank {rank}: tensor {t} piece from {j}: off by {bad}");
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }
}

/// A CUDA graph of `body()`, captured on a capture stream after `warm()` ran there once (cuBLAS
/// and NCCL set up outside the capture); with what the captured call returned.
fn capture<T>(
    ordinal: usize,
    warm: &mut dyn FnMut() -> Result<()>,
    body: &mut dyn FnMut() -> Result<T>,
) -> Result<(CudaGraph, T)> {
    let mut g = CudaGraph::new(ordinal)?;
    g.enter()?;
    let cap = (|| -> Result<T> {
        warm()?;
        g.begin()?;
        let out = body();
        g.end()?;
        out
    })();
    g.exit()?;
    Ok((g, cap?))
}

/// Median ms of one `body()` over `iters` replays of a graph of ten of them (launch cost out of
/// the figure), the ranks lined up by a barrier before each replay.
fn time_graph(c: &NcclComm, ordinal: usize, iters: usize, body: &dyn Fn() -> Result<()>) -> Result<f64> {
    let sync = || tch::Cuda::synchronize(ordinal as i64);
    let (g, ()) = capture(ordinal, &mut || body(), &mut || (0..10).try_for_each(|_| body()))?;
    let mut ms = Vec::with_capacity(iters);
    for _ in 0..iters {
        sync();
        c.barrier().map_err(anyhow::Error::msg)?;
        sync();
        let t = Instant::now();
        g.replay()?;
        sync();
        ms.push(t.elapsed().as_secs_f64() * 1e3 / 10.0);
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms[ms.len() / 2])
}

/// Check and timing of the Ring K/V exchange (3. in the module docs).
fn ring_rows(c: &NcclComm, ordinal: usize, a: &Args) -> Result<Vec<serde_json::Value>> {
    let dev = c.device();
    let (n, r) = (c.size(), c.rank() as i64);
    let (to, from) = ((c.rank() + 1) % n, (c.rank() + n - 1) % n);
    let sync = || tch::Cuda::synchronize(ordinal as i64);
    let mut lines = Vec::new();
    let work_a = Tensor::randn([64, 64], (Kind::Float, dev));
    let shape = [2, 1, 8, 2, 4];
    for started in [false, true] {
        let block = Tensor::zeros(shape, (Kind::Float, dev));
        let go = || -> Result<Tensor> {
            if started {
                let (got, p) = c
                    .start_send_recv(&block, to, &shape, Kind::Float, from)
                    .map_err(anyhow::Error::msg)?;
                let _ = work_a.matmul(&work_a);
                p.wait().map_err(anyhow::Error::msg)?;
                Ok(got)
            } else {
                c.send_recv(&block, to, &shape, Kind::Float, from)
                    .map_err(anyhow::Error::msg)
            }
        };
        let want = |salt: f64| from as f64 + salt;
        let exact = |got: &Tensor, salt: f64| -> Result<bool> {
            Ok(f64::try_from((got - want(salt)).abs().max())? == 0.0)
        };
        let _ = block.shallow_clone().fill_(r as f64);
        let got = go()?;
        sync();
        let eager = exact(&got, 0.0)?;
        c.barrier().map_err(anyhow::Error::msg)?;
        let (g, out) = capture(ordinal, &mut || go().map(|_| ()), &mut || go())?;
        sync();
        let _ = block.shallow_clone().fill_(r as f64 + 0.5);
        g.replay()?;
        sync();
        let graphed = exact(&out, 0.5)?;
        lines.push(serde_json::json!({
            "check": "send_recv", "rank": r, "ranks": n, "started": started,
            "eager_ok": eager, "graph_replay_ok": graphed,
        }));
    }
    let rows = a.rows / n as i64;
    let block = Tensor::randn([2, 1, rows, 24, 128], (Kind::BFloat16, dev));
    let bshape = block.size();
    let x_mod = Tensor::randn([rows, 3072], (Kind::BFloat16, dev));
    let w1 = Tensor::randn([3072, 12288], (Kind::BFloat16, dev));
    let ex = time_graph(c, ordinal, a.iters, &|| {
        c.send_recv(&block, to, &bshape, Kind::BFloat16, from)
            .map(|_| ())
            .map_err(anyhow::Error::msg)
    })?;
    let mm = time_graph(c, ordinal, a.iters, &|| {
        let _ = x_mod.matmul(&w1);
        Ok(())
    })?;
    let both = time_graph(c, ordinal, a.iters, &|| {
        let (_got, p) = c
            .start_send_recv(&block, to, &bshape, Kind::BFloat16, from)
            .map_err(anyhow::Error::msg)?;
        let _ = x_mod.matmul(&w1);
        p.wait().map_err(anyhow::Error::msg)
    })?;
    let bytes = block.numel() as i64 * 2;
    lines.push(serde_json::json!({
        "timing": "ring_kv_send_recv", "rank": r, "ranks": n, "rows_per_rank": rows,
        "sent_mib": bytes as f64 / 1048576.0, "exchange_us": ex * 1e3, "matmul_us": mm * 1e3,
        "started_exchange_plus_matmul_us": both * 1e3,
        "exchange_gib_s": bytes as f64 / (ex * 1e-3) / 1073741824.0, "hidden_us": (ex + mm - both) * 1e3,
    }));
    Ok(lines)
}

fn rank_main(c: NcclComm, a: &Args) -> Result<Vec<serde_json::Value>> {
    let dev = c.device();
    let Device::Cuda(ordinal) = dev else {
        bail!("not a CUDA device")
    };
    nccl::bind_thread_to_device(ordinal).map_err(anyhow::Error::msg)?;
    let (n, r) = (c.size() as i64, c.rank() as i64);
    let mut lines = Vec::new();
    let sync = || tch::Cuda::synchronize(ordinal as i64);

    // 1. Check.
    let (rows, hu, d) = (8, 2, 4);
    let work_a = Tensor::randn([64, 64], (Kind::Float, dev));
    for mode in [AllToAll::P2p, AllToAll::Collective] {
        c.set_all_to_all(mode);
        for started in [false, true] {
            let x = Exchange::new(n, rows, hu, d, Kind::Float, dev);
            let go = |x: &Exchange| -> Result<Tensor> {
                if started {
                    let p = c
                        .start_all_to_all_into(&x.ins, &x.outs)
                        .map_err(anyhow::Error::msg)?;
                    let w = work_a.matmul(&work_a);
                    p.wait().map_err(anyhow::Error::msg)?;
                    Ok(w)
                } else {
                    c.all_to_all_into(&x.ins, &x.outs).map_err(anyhow::Error::msg)?;
                    Ok(work_a.shallow_clone())
                }
            };
            x.fill(r, 0.0);
            let _ = go(&x)?;
            sync();
            let eager = x.verify(r, n, rows, 0.0)?;
            // Captured once, replayed with new inputs.
            c.barrier().map_err(anyhow::Error::msg)?;
            let warm = &mut || {
                x.fill(r, 0.0);
                go(&x).map(|_| ())
            };
            let (g, _) = capture(ordinal, warm, &mut || go(&x))?;
            sync();
            x.fill(r, 0.5);
            g.replay()?;
            sync();
            let graphed = x.verify(r, n, rows, 0.5)?;
            lines.push(serde_json::json!({
                "check": "all_to_all_into", "rank": r, "ranks": n, "mode": format!("{mode:?}"),
                "started": started, "eager_ok": eager, "graph_replay_ok": graphed,
            }));
        }
    }

    // 2. Timing at Flux.1-dev shapes.
    let (rows, hu, d, h, mlp) = (a.rows / n, 24 / n, 128, 3072, 12288);
    let x_mod = Tensor::randn([rows, h], (Kind::BFloat16, dev));
    let w1 = Tensor::randn([h, mlp], (Kind::BFloat16, dev));
    let gemm = || x_mod.matmul(&w1);
    for mode in [AllToAll::P2p, AllToAll::Collective] {
        c.set_all_to_all(mode);
        let x = Exchange::new(n, rows, hu, d, Kind::BFloat16, dev);
        let time = |what: &str| -> Result<f64> {
            let body = |x: &Exchange| -> Result<()> {
                match what {
                    "exchange" => c.all_to_all_into(&x.ins, &x.outs).map_err(anyhow::Error::msg)?,
                    "matmul" => {
                        let _ = gemm();
                    }
                    _ => {
                        let p = c
                            .start_all_to_all_into(&x.ins, &x.outs)
                            .map_err(anyhow::Error::msg)?;
                        let _ = gemm();
                        p.wait().map_err(anyhow::Error::msg)?;
                    }
                }
                Ok(())
            };
            time_graph(&c, ordinal, a.iters, &|| body(&x))
        };
        let ex = time("exchange")?;
        let mm = time("matmul")?;
        let both = time("both")?;
        let bytes = 3 * (n - 1) * rows * hu * d * 2;
        lines.push(serde_json::json!({
            "timing": "ulysses_qkv_exchange", "rank": r, "ranks": n, "mode": format!("{mode:?}"),
            "rows_per_rank": rows, "heads_per_rank": hu, "sent_mib": bytes as f64 / 1048576.0,
            "exchange_us": ex * 1e3, "matmul_us": mm * 1e3, "started_exchange_plus_matmul_us": both * 1e3,
            "exchange_gib_s": bytes as f64 / (ex * 1e-3) / 1073741824.0,
            "hidden_us": (ex + mm - both) * 1e3,
        }));
    }
    lines.extend(ring_rows(&c, ordinal, a)?);
    Ok(lines)
}

fn main() -> Result<()> {
    let a = parse()?;
    let _guard = tch::no_grad_guard();
    let version = nccl::check_single_nccl().map_err(anyhow::Error::msg)?;
    eprintln!("cuda devices: {}, NCCL {version}", tch::Cuda::device_count());
    let comms = NcclComm::init_all(&a.devices).map_err(anyhow::Error::msg)?;
    let results: Vec<Result<Vec<serde_json::Value>>> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|c| {
                let a = &a;
                s.spawn(move || rank_main(c, a))
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("rank thread")).collect()
    });
    let mut ok = true;
    for r in results {
        for line in r? {
            if line.get("check").is_some() && !(line["eager_ok"] == true && line["graph_replay_ok"] == true) {
                ok = false;
            }
            println!("{line}");
        }
    }
    if !ok {
        bail!("a received piece did not hold what its peer sent");
    }
    Ok(())
}
