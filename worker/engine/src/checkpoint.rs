//! Step checkpoints: the denoising state after some step, so an interrupted generation can resume
//! there (on any worker with the same plan) and produce the same image as an uninterrupted run.
//!
//! One format for every model family and plan ([`LoopState`]): a safetensors file with the whole
//! latent sample as computed (`latents`, e.g. bf16 on a GPU, so resuming is exact), the step
//! (`step`, int64) and the scheduler's state: one part per rank that stepped a slice of the
//! sample (`scheduler.<i>`, uint8 bytes of [`crate::schedulers::Scheduler::state_bytes`], with
//! `scheduler.<i>.slice` = `[dim, start, len]` of the rank's slice, absent for the whole sample).
//! Files written before the scheduler state was recorded (latents and step only) still load:
//! they came from the stateless flow-matching sampler. A job run with LoRA adapters records its
//! stack (`lora`, uint8 bytes of [`crate::lora::stack_id`]); a checkpoint resumes only a job with
//! the same stack (none recorded: no adapters).

use tch::{Device, Kind, Tensor};

use crate::EngineError;

/// The state after `step` denoising steps, serialised by the engine that made it (a
/// [`LoopState`] for the tch engines).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepCheckpoint {
    /// Steps already taken (1-based index of the last finished step).
    pub step: u32,
    pub bytes: Vec<u8>,
}

/// The part of the sample one rank steps: `len` entries from `start` along `dim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice {
    pub dim: i64,
    pub start: i64,
    pub len: i64,
}

/// One rank's scheduler state (or the only one, for a sample stepped whole).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerPart {
    pub slice: Option<Slice>,
    pub state: Vec<u8>,
}

/// The denoising loop's whole state after `step` steps.
#[derive(Debug)]
pub struct LoopState {
    pub step: u32,
    /// The whole latent sample, on the CPU, in the dtype the loop computed it in.
    pub latents: Tensor,
    pub scheduler: Vec<SchedulerPart>,
    /// The LoRA stack the steps ran under ([`crate::lora::stack_id`]; empty: none).
    pub lora: String,
}

/// A temporary file path, removed on drop (tch reads and writes safetensors through files).
struct TempPath(std::path::PathBuf);

impl TempPath {
    fn new() -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(std::env::temp_dir().join(format!("ditfleet-ckpt-{}-{n}.safetensors", std::process::id())))
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn bad(msg: impl Into<String>) -> EngineError {
    EngineError::BadCheckpoint(msg.into())
}

impl LoopState {
    /// Another handle on the same state (the latents' storage is shared, not copied): one for
    /// each rank thread of a parallel plan.
    pub fn share(&self) -> LoopState {
        LoopState {
            step: self.step,
            latents: self.latents.shallow_clone(),
            scheduler: self.scheduler.clone(),
            lora: self.lora.clone(),
        }
    }

    /// Refuses to resume a job under another LoRA stack than the one its steps ran under (the
    /// image would be neither's).
    pub fn check_lora(&self, loras: &[crate::LoraRef]) -> Result<(), EngineError> {
        let want = crate::lora::stack_id(loras);
        if self.lora != want {
            let show = |s: &str| {
                if s.is_empty() {
                    "no LoRA".to_string()
                } else {
                    s.to_string()
                }
            };
            return Err(bad(format!(
                "the checkpoint was written under LoRA stack {} and this job runs {}: it cannot resume it",
                show(&self.lora),
                show(&want)
            )));
        }
        Ok(())
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>, EngineError> {
        let tmp = TempPath::new();
        let latents = self.latents.f_to_device(Device::Cpu)?.f_contiguous()?;
        let step = Tensor::f_from_slice(&[i64::from(self.step)])?;
        let mut named: Vec<(String, Tensor)> = vec![("latents".into(), latents), ("step".into(), step)];
        for (i, part) in self.scheduler.iter().enumerate() {
            named.push((format!("scheduler.{i}"), Tensor::f_from_slice(&part.state)?));
            if let Some(s) = part.slice {
                named.push((
                    format!("scheduler.{i}.slice"),
                    Tensor::f_from_slice(&[s.dim, s.start, s.len])?,
                ));
            }
        }
        if !self.lora.is_empty() {
            named.push(("lora".into(), Tensor::f_from_slice(self.lora.as_bytes())?));
        }
        let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
        Tensor::write_safetensors(&refs, &tmp.0)?;
        Ok(std::fs::read(&tmp.0)?)
    }

    /// The state a checkpoint holds, checked against the step its pointer names.
    pub fn from_checkpoint(c: &StepCheckpoint) -> Result<Self, EngineError> {
        let s = Self::from_bytes(&c.bytes)?;
        if s.step != c.step {
            return Err(bad(format!(
                "checkpoint holds step {}, its pointer says {}",
                s.step, c.step
            )));
        }
        Ok(s)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, EngineError> {
        let tmp = TempPath::new();
        std::fs::write(&tmp.0, bytes)?;
        let tensors = Tensor::read_safetensors(&tmp.0)
            .map_err(|e| bad(format!("not a safetensors checkpoint: {e}")))?;
        let get = |name: &str| {
            tensors
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.shallow_clone())
        };
        let step = get("step").ok_or_else(|| bad("checkpoint has no \"step\" tensor"))?;
        if step.numel() != 1 || step.kind() != Kind::Int64 {
            return Err(bad("\"step\" is not one int64"));
        }
        let step = u32::try_from(step.f_int64_value(&[0])?).map_err(|_| bad("step out of range"))?;
        let latents = get("latents").ok_or_else(|| bad("checkpoint has no \"latents\" tensor"))?;
        let mut scheduler = Vec::new();
        while let Some(t) = get(&format!("scheduler.{}", scheduler.len())) {
            let i = scheduler.len();
            if t.kind() != Kind::Uint8 || t.dim() != 1 {
                return Err(bad(format!("scheduler.{i} is not a byte vector")));
            }
            let mut state = vec![0u8; t.numel()];
            t.f_copy_data_u8(&mut state, t.numel())?;
            let slice = match get(&format!("scheduler.{i}.slice")) {
                None => None,
                Some(s) if s.kind() == Kind::Int64 && s.numel() == 3 => Some(Slice {
                    dim: s.f_int64_value(&[0])?,
                    start: s.f_int64_value(&[1])?,
                    len: s.f_int64_value(&[2])?,
                }),
                Some(_) => return Err(bad(format!("scheduler.{i}.slice is not three int64"))),
            };
            scheduler.push(SchedulerPart { slice, state });
        }
        let lora = match get("lora") {
            None => String::new(),
            Some(t) if t.kind() == Kind::Uint8 && t.dim() == 1 => {
                let mut b = vec![0u8; t.numel()];
                t.f_copy_data_u8(&mut b, t.numel())?;
                String::from_utf8(b).map_err(|_| bad("\"lora\" is not UTF-8"))?
            }
            Some(_) => return Err(bad("\"lora\" is not a byte vector")),
        };
        Ok(Self {
            step,
            latents,
            scheduler,
            lora,
        })
    }

    /// The scheduler state a rank that steps `slice` of the sample resumes from: the part written
    /// for the same slice; for a scheduler whose state holds no sample-shaped tensors, any part
    /// (its state does not depend on the split). `None`: the checkpoint recorded no state (a
    /// stateless sampler's older file).
    pub fn scheduler_state_for(
        &self,
        slice: Option<Slice>,
        carries_tensors: bool,
    ) -> Result<Option<&[u8]>, EngineError> {
        if self.scheduler.is_empty() {
            if carries_tensors {
                return Err(bad(
                    "the checkpoint holds no scheduler state and this scheduler needs its previous outputs",
                ));
            }
            return Ok(None);
        }
        if let Some(p) = self.scheduler.iter().find(|p| p.slice == slice) {
            return Ok(Some(&p.state));
        }
        if !carries_tensors {
            return Ok(Some(&self.scheduler[0].state));
        }
        Err(bad(format!(
            "the checkpoint's scheduler state was written for another split of the sample (slices {:?}, this rank steps {slice:?})",
            self.scheduler.iter().map(|p| p.slice).collect::<Vec<_>>()
        )))
    }

    /// This rank's part of the checkpoint's latents, on `device` in `kind`, checked against the
    /// shape the request gives (`want` = the whole sample's shape).
    pub fn latents_for(
        &self,
        want: &[i64],
        slice: Option<Slice>,
        device: Device,
        kind: Kind,
    ) -> Result<Tensor, EngineError> {
        if self.latents.size() != want {
            return Err(bad(format!(
                "latents {:?} do not fit this job (want {want:?})",
                self.latents.size()
            )));
        }
        let x = match slice {
            Some(s) => self.latents.f_narrow(s.dim, s.start, s.len)?,
            None => self.latents.shallow_clone(),
        };
        Ok(x.f_to_device(device)?.f_to_kind(kind)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_state_round_trips_with_per_slice_scheduler_parts() {
        let x = Tensor::f_arange(24, (Kind::BFloat16, Device::Cpu))
            .unwrap()
            .reshape([1, 4, 6]);
        let s = LoopState {
            step: 7,
            latents: x.shallow_clone(),
            scheduler: vec![
                SchedulerPart {
                    slice: Some(Slice {
                        dim: 1,
                        start: 0,
                        len: 3,
                    }),
                    state: vec![1, 2, 3],
                },
                SchedulerPart {
                    slice: Some(Slice {
                        dim: 1,
                        start: 3,
                        len: 1,
                    }),
                    state: vec![9],
                },
            ],
            lora: "style@1#abc*3f800000".into(),
        };
        let back = LoopState::from_bytes(&s.to_bytes().unwrap()).unwrap();
        assert_eq!(back.step, 7);
        assert!(back.latents.equal(&x));
        assert_eq!(back.latents.kind(), Kind::BFloat16);
        assert_eq!(back.scheduler, s.scheduler);
        assert_eq!(back.lora, s.lora);
        let second = Some(Slice {
            dim: 1,
            start: 3,
            len: 1,
        });
        assert_eq!(back.scheduler_state_for(second, true).unwrap(), Some(&[9u8][..]));
        // Another split: fine for a stateless scheduler, refused for a multistep one.
        let other = Some(Slice {
            dim: 1,
            start: 0,
            len: 2,
        });
        assert_eq!(
            back.scheduler_state_for(other, false).unwrap(),
            Some(&[1u8, 2, 3][..])
        );
        assert!(matches!(
            back.scheduler_state_for(other, true),
            Err(EngineError::BadCheckpoint(_))
        ));
        let part = back
            .latents_for(&[1, 4, 6], second, Device::Cpu, Kind::Float)
            .unwrap();
        assert!(part.equal(&x.narrow(1, 3, 1).to_kind(Kind::Float)));
        assert!(
            back.latents_for(&[1, 4, 7], None, Device::Cpu, Kind::Float)
                .is_err()
        );
    }

    #[test]
    fn a_file_without_scheduler_state_loads_for_a_stateless_scheduler_only() {
        let tmp = TempPath::new();
        let x = Tensor::f_zeros([1, 2, 3], (Kind::Float, Device::Cpu)).unwrap();
        let step = Tensor::f_from_slice(&[3i64]).unwrap();
        Tensor::write_safetensors(&[("latents", &x), ("step", &step)], &tmp.0).unwrap();
        let s = LoopState::from_bytes(&std::fs::read(&tmp.0).unwrap()).unwrap();
        assert_eq!(s.step, 3);
        assert_eq!(s.lora, "", "no stack recorded: no LoRA");
        s.check_lora(&[]).unwrap();
        assert_eq!(s.scheduler_state_for(None, false).unwrap(), None);
        assert!(s.scheduler_state_for(None, true).is_err());
        assert!(matches!(
            LoopState::from_bytes(b"not a checkpoint"),
            Err(EngineError::BadCheckpoint(_))
        ));
    }
}
