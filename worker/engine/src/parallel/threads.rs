//! In-process backend: the ranks of a group are threads of this process exchanging CPU tensors
//! through shared slots. Semantically the same collectives as NCCL (every member calls them in
//! the same order), so every parallel strategy is exercised in CI without a GPU. Results are
//! deterministic: reductions sum in rank order on every rank.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use super::comm::{CommError, CommFactory, CommResult, Communicator};

const BACKEND: &str = "threads";

/// State shared by the members of one group.
struct Shared {
    n: usize,
    /// `slots[src][dst]`: what `src` deposited for `dst` in the current collective.
    slots: Mutex<Vec<Vec<Option<Tensor>>>>,
    /// Barrier: (arrived, generation).
    gate: Mutex<(usize, u64)>,
    gate_cv: Condvar,
    /// `p2p[src][dst]`.
    senders: Vec<Vec<Mutex<Sender<Tensor>>>>,
    receivers: Vec<Vec<Mutex<Receiver<Tensor>>>>,
    aborted: AtomicBool,
    timeout: Duration,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One rank of a threads group.
pub struct ThreadComm {
    rank: usize,
    device: Device,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ThreadComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ThreadComm({}/{})", self.rank, self.shared.n)
    }
}

impl ThreadComm {
    /// A group of `n` ranks computing on `device` (normally the CPU). A collective waits at most
    /// `timeout` for its peers, then fails with [`CommError::Timeout`].
    pub fn group(n: usize, device: Device, timeout: Duration) -> Vec<ThreadComm> {
        let mut senders: Vec<Vec<Mutex<Sender<Tensor>>>> = (0..n).map(|_| Vec::new()).collect();
        let mut receivers: Vec<Vec<Mutex<Receiver<Tensor>>>> = (0..n).map(|_| Vec::new()).collect();
        for src in 0..n {
            for _dst in 0..n {
                let (tx, rx) = channel();
                senders[src].push(Mutex::new(tx));
                receivers[src].push(Mutex::new(rx));
            }
        }
        let shared = Arc::new(Shared {
            n,
            slots: Mutex::new((0..n).map(|_| (0..n).map(|_| None).collect()).collect()),
            gate: Mutex::new((0, 0)),
            gate_cv: Condvar::new(),
            senders,
            receivers,
            aborted: AtomicBool::new(false),
            timeout,
        });
        (0..n)
            .map(|rank| ThreadComm {
                rank,
                device,
                shared: shared.clone(),
            })
            .collect()
    }

    fn check(&self) -> CommResult<()> {
        if self.shared.aborted.load(Ordering::SeqCst) {
            return Err(CommError::Aborted { backend: BACKEND });
        }
        Ok(())
    }

    /// Waits until every member arrived (or the timeout / an abort).
    fn wait_all(&self, op: &'static str) -> CommResult<()> {
        self.check()?;
        let s = &self.shared;
        let mut g = lock(&s.gate);
        let generation = g.1;
        g.0 += 1;
        if g.0 == s.n {
            g.0 = 0;
            g.1 += 1;
            s.gate_cv.notify_all();
            return Ok(());
        }
        let deadline = Instant::now() + s.timeout;
        while g.1 == generation {
            if s.aborted.load(Ordering::SeqCst) {
                return Err(CommError::Aborted { backend: BACKEND });
            }
            let now = Instant::now();
            if now >= deadline {
                // The barrier count is now off: the group is unusable, as an NCCL comm would be.
                s.aborted.store(true, Ordering::SeqCst);
                s.gate_cv.notify_all();
                return Err(CommError::Timeout {
                    backend: BACKEND,
                    op,
                    rank: self.rank,
                    secs: s.timeout.as_secs(),
                });
            }
            // Wake up periodically to notice an abort.
            let wait = (deadline - now).min(Duration::from_millis(100));
            g = s
                .gate_cv
                .wait_timeout(g, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    /// Deposits `parts[dst]` for every `dst`, waits, then takes what every `src` left for this
    /// rank; the second wait keeps the slots from being reused before everyone has read them.
    fn exchange(&self, op: &'static str, parts: Vec<Option<Tensor>>) -> CommResult<Vec<Option<Tensor>>> {
        {
            let mut slots = lock(&self.shared.slots);
            for (dst, p) in parts.into_iter().enumerate() {
                slots[self.rank][dst] = p;
            }
        }
        self.wait_all(op)?;
        let got = {
            let mut slots = lock(&self.shared.slots);
            (0..self.shared.n)
                .map(|src| slots[src][self.rank].take())
                .collect()
        };
        self.wait_all(op)?;
        Ok(got)
    }

    fn to_device(&self, t: &Tensor) -> CommResult<Tensor> {
        // A deep copy: the receiver must not alias the sender's buffer.
        Ok(t.f_to_device(self.device)?.f_detach_copy()?)
    }
}

fn usage(op: &'static str, message: String) -> CommError {
    CommError::Usage { op, message }
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.n
    }

    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn device(&self) -> Device {
        self.device
    }

    fn all_to_all(&self, inputs: &[Tensor], out_shapes: &[Vec<i64>]) -> CommResult<Vec<Tensor>> {
        let n = self.shared.n;
        super::comm::check_all_to_all(n, inputs, out_shapes)?;
        let parts = inputs
            .iter()
            .map(|t| self.to_device(t).map(Some))
            .collect::<CommResult<Vec<_>>>()?;
        let got = self.exchange("all_to_all", parts)?;
        got.into_iter()
            .zip(out_shapes)
            .enumerate()
            .map(|(src, (t, shape))| {
                let t = t.ok_or_else(|| usage("all_to_all", format!("nothing from rank {src}")))?;
                if t.size() != *shape {
                    return Err(usage(
                        "all_to_all",
                        format!("rank {src} sent {:?}, expected {shape:?}", t.size()),
                    ));
                }
                Ok(t)
            })
            .collect()
    }

    fn all_gather(&self, t: &Tensor) -> CommResult<Vec<Tensor>> {
        let parts = (0..self.shared.n)
            .map(|_| self.to_device(t).map(Some))
            .collect::<CommResult<Vec<_>>>()?;
        let got = self.exchange("all_gather", parts)?;
        got.into_iter()
            .enumerate()
            .map(|(src, x)| {
                let x = x.ok_or_else(|| usage("all_gather", format!("nothing from rank {src}")))?;
                if x.size() != t.size() {
                    return Err(usage(
                        "all_gather",
                        format!("rank {src} has {:?}, this rank {:?}", x.size(), t.size()),
                    ));
                }
                Ok(x)
            })
            .collect()
    }

    fn all_reduce_sum(&self, t: &Tensor) -> CommResult<Tensor> {
        let parts = self.all_gather(t)?;
        let mut acc = parts[0].shallow_clone();
        for p in &parts[1..] {
            acc = acc.f_add(p)?;
        }
        Ok(acc)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> CommResult<Tensor> {
        let parts = (0..self.shared.n)
            .map(|_| {
                if self.rank == root {
                    self.to_device(t).map(Some)
                } else {
                    Ok(None)
                }
            })
            .collect::<CommResult<Vec<_>>>()?;
        let mut got = self.exchange("broadcast", parts)?;
        let x = got[root]
            .take()
            .ok_or_else(|| usage("broadcast", format!("root {root} sent nothing")))?;
        if x.size() != t.size() {
            return Err(usage(
                "broadcast",
                format!("root sent {:?}, expected {:?}", x.size(), t.size()),
            ));
        }
        Ok(x)
    }

    fn send(&self, t: &Tensor, dst: usize) -> CommResult<()> {
        self.check()?;
        let t = self.to_device(t)?;
        lock(&self.shared.senders[self.rank][dst])
            .send(t)
            .map_err(|_| CommError::Backend {
                backend: BACKEND,
                op: "send",
                rank: self.rank,
                message: format!("rank {dst} is gone"),
            })
    }

    fn recv(&self, shape: &[i64], kind: Kind, src: usize) -> CommResult<Tensor> {
        let rx = lock(&self.shared.receivers[src][self.rank]);
        let deadline = Instant::now() + self.shared.timeout;
        loop {
            self.check()?;
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(t) => {
                    if t.size() != shape || t.kind() != kind {
                        return Err(usage(
                            "recv",
                            format!(
                                "rank {src} sent {:?} {:?}, expected {shape:?} {kind:?}",
                                t.size(),
                                t.kind()
                            ),
                        ));
                    }
                    return Ok(t);
                }
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => continue,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(CommError::Timeout {
                        backend: BACKEND,
                        op: "recv",
                        rank: self.rank,
                        secs: self.shared.timeout.as_secs(),
                    });
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(CommError::Backend {
                        backend: BACKEND,
                        op: "recv",
                        rank: self.rank,
                        message: format!("rank {src} is gone"),
                    });
                }
            }
        }
    }

    fn barrier(&self) -> CommResult<()> {
        self.wait_all("barrier")
    }

    fn abort(&self) {
        self.shared.aborted.store(true, Ordering::SeqCst);
        self.shared.gate_cv.notify_all();
    }

    fn abort_handle(&self) -> super::comm::AbortHandle {
        let shared = self.shared.clone();
        Arc::new(move || {
            shared.aborted.store(true, Ordering::SeqCst);
            shared.gate_cv.notify_all();
        })
    }

    fn is_aborted(&self) -> bool {
        self.shared.aborted.load(Ordering::SeqCst)
    }
}

/// Creates threads groups whose ranks all compute on one device (the CPU in tests).
#[derive(Debug, Clone)]
pub struct ThreadsFactory {
    pub device: Device,
    pub timeout: Duration,
}

impl ThreadsFactory {
    pub fn cpu() -> Self {
        Self {
            device: Device::Cpu,
            timeout: Duration::from_secs(300),
        }
    }
}

impl CommFactory for ThreadsFactory {
    fn group(&self, members: &[usize]) -> CommResult<Vec<Box<dyn Communicator>>> {
        Ok(ThreadComm::group(members.len(), self.device, self.timeout)
            .into_iter()
            .map(|c| Box::new(c) as Box<dyn Communicator>)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<F, R>(n: usize, f: F) -> Vec<R>
    where
        F: Fn(ThreadComm) -> R + Send + Sync + 'static,
        R: Send + 'static,
    {
        let f = Arc::new(f);
        let handles: Vec<_> = ThreadComm::group(n, Device::Cpu, Duration::from_secs(20))
            .into_iter()
            .map(|c| {
                let f = f.clone();
                std::thread::spawn(move || f(c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    fn vals(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()
    }

    #[test]
    fn collectives_deliver_each_ranks_data_to_the_right_peer() {
        let out = run(3, |c| {
            let r = c.rank() as f32;
            // rank r sends [10 r + j] (length j + 1) to rank j.
            let inputs: Vec<Tensor> = (0..3)
                .map(|j| {
                    Tensor::full(
                        [j as i64 + 1],
                        (10.0 * r + j as f32) as f64,
                        (Kind::Float, Device::Cpu),
                    )
                })
                .collect();
            let shapes: Vec<Vec<i64>> = (0..3).map(|_| vec![c.rank() as i64 + 1]).collect();
            let a2a: Vec<Vec<f32>> = c.all_to_all(&inputs, &shapes).unwrap().iter().map(vals).collect();
            let me = Tensor::from_slice(&[r, r * r]);
            let gathered: Vec<Vec<f32>> = c.all_gather(&me).unwrap().iter().map(vals).collect();
            let sum = vals(&c.all_reduce_sum(&me).unwrap());
            let b = vals(&c.broadcast(&me, 2).unwrap());
            // ring: send to the next rank, receive from the previous one.
            c.send(&me, (c.rank() + 1) % 3).unwrap();
            let prev = vals(&c.recv(&[2], Kind::Float, (c.rank() + 2) % 3).unwrap());
            c.barrier().unwrap();
            (a2a, gathered, sum, b, prev)
        });
        for (rank, (a2a, gathered, sum, b, prev)) in out.into_iter().enumerate() {
            for (src, got) in a2a.iter().enumerate() {
                assert_eq!(got, &vec![(10 * src + rank) as f32; rank + 1]);
            }
            assert_eq!(gathered, vec![vec![0.0, 0.0], vec![1.0, 1.0], vec![2.0, 4.0]]);
            assert_eq!(sum, vec![3.0, 5.0]);
            assert_eq!(b, vec![2.0, 4.0]);
            let p = ((rank + 2) % 3) as f32;
            assert_eq!(prev, vec![p, p * p]);
        }
    }

    #[test]
    fn a_missing_peer_times_out_and_abort_releases_waiters() {
        let mut comms = ThreadComm::group(2, Device::Cpu, Duration::from_millis(300));
        let c1 = comms.pop().unwrap();
        let c0 = comms.pop().unwrap();
        // Rank 1 never arrives.
        let err = c0.barrier().unwrap_err();
        assert!(matches!(err, CommError::Timeout { op: "barrier", .. }), "{err}");
        let waiter = std::thread::spawn(move || c0.all_gather(&Tensor::from_slice(&[1f32])).unwrap_err());
        std::thread::sleep(Duration::from_millis(50));
        c1.abort();
        let err = waiter.join().unwrap();
        assert!(
            matches!(err, CommError::Aborted { .. } | CommError::Timeout { .. }),
            "{err}"
        );
        assert!(matches!(c1.barrier().unwrap_err(), CommError::Aborted { .. }));
    }
}
