//! The byte format of [`super::Scheduler::state_bytes`]: a small little-endian header, then
//! fields in a fixed order, tensors as raw little-endian element bytes.
//!
//! ```text
//! u8 version (1) | u8 scheduler kind | u32 steps in the schedule | fields...
//! u32 field        : a counter (e.g. DPM-Solver's lower_order_nums, next step index)
//! optional tensor  : u8 present; if 1: u8 dtype | u8 ndim | i64 dims[ndim] | element bytes
//! ```
//! Tensors are stored from the CPU and restored there; schedulers move them to the sample's
//! device when they use them.

use tch::{Device, Kind, Tensor};

use super::config::SchedulerKind;
use crate::EngineError;

const VERSION: u8 = 1;

fn kind_tag(k: SchedulerKind) -> u8 {
    match k {
        SchedulerKind::EulerDiscrete => 1,
        SchedulerKind::EulerAncestralDiscrete => 2,
        SchedulerKind::DpmSolverMultistep => 3,
        SchedulerKind::FlowMatchEulerDiscrete => 4,
    }
}

fn dtype_tag(k: Kind) -> Option<u8> {
    Some(match k {
        Kind::Float => 0,
        Kind::Half => 1,
        Kind::BFloat16 => 2,
        Kind::Double => 3,
        _ => return None,
    })
}

fn dtype_from_tag(t: u8) -> Option<Kind> {
    Some(match t {
        0 => Kind::Float,
        1 => Kind::Half,
        2 => Kind::BFloat16,
        3 => Kind::Double,
        _ => return None,
    })
}

fn bad(msg: impl std::fmt::Display) -> EngineError {
    EngineError::BadCheckpoint(format!("scheduler state: {msg}"))
}

/// Writes a state.
pub struct StateWriter {
    buf: Vec<u8>,
}

impl StateWriter {
    pub fn new(kind: SchedulerKind, steps: usize) -> Self {
        let mut buf = vec![VERSION, kind_tag(kind)];
        buf.extend_from_slice(&(steps as u32).to_le_bytes());
        Self { buf }
    }

    pub fn u32(&mut self, v: usize) {
        self.buf.extend_from_slice(&(v as u32).to_le_bytes());
    }

    pub fn tensor(&mut self, t: Option<&Tensor>) -> Result<(), EngineError> {
        let Some(t) = t else {
            self.buf.push(0);
            return Ok(());
        };
        let tag = dtype_tag(t.kind()).ok_or_else(|| bad(format!("cannot store a {:?} tensor", t.kind())))?;
        let t = t.f_to_device(Device::Cpu)?.f_contiguous()?;
        let dims = t.size();
        self.buf.extend_from_slice(&[1, tag, dims.len() as u8]);
        for d in &dims {
            self.buf.extend_from_slice(&d.to_le_bytes());
        }
        let numel = t.numel();
        let start = self.buf.len();
        self.buf.resize(start + numel * t.kind().elt_size_in_bytes(), 0);
        t.f_copy_data_u8(&mut self.buf[start..], numel)?;
        Ok(())
    }

    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads a state written by [`StateWriter`], checking the header against the scheduler.
pub struct StateReader<'a> {
    buf: &'a [u8],
}

impl<'a> StateReader<'a> {
    pub fn new(buf: &'a [u8], kind: SchedulerKind, steps: usize) -> Result<Self, EngineError> {
        let mut r = Self { buf };
        let version = r.take(1)?[0];
        if version != VERSION {
            return Err(bad(format!("version {version} (this build reads {VERSION})")));
        }
        let tag = r.take(1)?[0];
        if tag != kind_tag(kind) {
            return Err(bad(format!(
                "written by another scheduler (tag {tag}), not {}",
                kind.class_name()
            )));
        }
        let saved = r.u32()?;
        if saved != steps {
            return Err(bad(format!(
                "written for a {saved}-step schedule, this one has {steps} steps"
            )));
        }
        Ok(r)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], EngineError> {
        if self.buf.len() < n {
            return Err(bad("truncated"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    pub fn u32(&mut self) -> Result<usize, EngineError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }

    pub fn tensor(&mut self) -> Result<Option<Tensor>, EngineError> {
        if self.take(1)?[0] == 0 {
            return Ok(None);
        }
        let head = self.take(2)?;
        let kind = dtype_from_tag(head[0]).ok_or_else(|| bad(format!("unknown dtype tag {}", head[0])))?;
        let ndim = head[1] as usize;
        let mut dims = Vec::with_capacity(ndim);
        for _ in 0..ndim {
            let b = self.take(8)?;
            let d = i64::from_le_bytes(b.try_into().map_err(|_| bad("truncated"))?);
            if d < 0 {
                return Err(bad(format!("negative dimension {d}")));
            }
            dims.push(d);
        }
        let numel = dims
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d as usize))
            .ok_or_else(|| bad("tensor too large"))?;
        let nbytes = numel
            .checked_mul(kind.elt_size_in_bytes())
            .ok_or_else(|| bad("tensor too large"))?;
        let data = self.take(nbytes)?;
        Ok(Some(Tensor::f_from_data_size(data, &dims, kind)?))
    }

    /// Errors when bytes are left over (another format).
    pub fn finish(self) -> Result<(), EngineError> {
        if !self.buf.is_empty() {
            return Err(bad(format!("{} unexpected trailing bytes", self.buf.len())));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_and_counters_round_trip_bit_exactly() {
        let t = Tensor::randn([2, 3, 4], (Kind::Float, Device::Cpu));
        let h = Tensor::randn([5], (Kind::BFloat16, Device::Cpu));
        let mut w = StateWriter::new(SchedulerKind::DpmSolverMultistep, 20);
        w.u32(7);
        w.tensor(Some(&t)).unwrap();
        w.tensor(None).unwrap();
        w.tensor(Some(&h)).unwrap();
        let bytes = w.finish();
        assert_eq!(bytes[0], VERSION);
        let mut r = StateReader::new(&bytes, SchedulerKind::DpmSolverMultistep, 20).unwrap();
        assert_eq!(r.u32().unwrap(), 7);
        assert!(r.tensor().unwrap().unwrap().equal(&t));
        assert!(r.tensor().unwrap().is_none());
        let h2 = r.tensor().unwrap().unwrap();
        assert_eq!(h2.kind(), Kind::BFloat16);
        assert!(h2.equal(&h));
        r.finish().unwrap();
    }

    #[test]
    fn a_state_for_another_scheduler_or_schedule_or_version_is_refused() {
        let bytes = StateWriter::new(SchedulerKind::EulerDiscrete, 10).finish();
        let e = StateReader::new(&bytes, SchedulerKind::DpmSolverMultistep, 10)
            .err()
            .unwrap();
        assert!(matches!(e, EngineError::BadCheckpoint(_)) && e.to_string().contains("another scheduler"));
        let e = StateReader::new(&bytes, SchedulerKind::EulerDiscrete, 11)
            .err()
            .unwrap();
        assert!(e.to_string().contains("10-step schedule"), "{e}");
        let mut v2 = bytes.clone();
        v2[0] = 9;
        assert!(
            StateReader::new(&v2, SchedulerKind::EulerDiscrete, 10)
                .err()
                .unwrap()
                .to_string()
                .contains("version 9")
        );
        assert!(
            StateReader::new(&bytes[..3], SchedulerKind::EulerDiscrete, 10)
                .err()
                .unwrap()
                .to_string()
                .contains("truncated")
        );
    }
}
