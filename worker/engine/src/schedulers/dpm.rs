//! diffusers' `DPMSolverMultistepScheduler` with `algorithm_type = "dpmsolver++"` (DPM++ 2M and
//! its first- and third-order relatives).

use tch::{Device, Kind, Tensor};

use super::config::{Reader, SchedulerKind};
use super::discrete::{self, FinalSigmas, PredictionType, TimestepSpacing, Train, TrainConfig};
use super::state::{StateReader, StateWriter};
use super::{Scheduler, check_step, numpy, scalar, torch_exp, torch_log};
use crate::EngineError;

/// `solver_type`: the second-order update's form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SolverType {
    Midpoint,
    Heun,
}

/// The options of diffusers' `DPMSolverMultistepScheduler` this implementation takes.
#[derive(Debug, Clone, PartialEq)]
pub struct DpmSolverMultistepConfig {
    pub train: TrainConfig,
    /// 1, 2 (DPM++ 2M) or 3.
    pub solver_order: usize,
    pub prediction_type: PredictionType,
    pub solver_type: SolverType,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    pub use_karras_sigmas: bool,
    pub final_sigmas_type: FinalSigmas,
    pub lambda_min_clipped: f64,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
}

impl DpmSolverMultistepConfig {
    /// DPM++ 2M on SDXL base 1.0 (what `DPMSolverMultistepScheduler.from_config(sdxl_config)`
    /// builds); `karras` sets `use_karras_sigmas` ("DPM++ 2M Karras").
    pub fn sdxl(karras: bool) -> Self {
        Self {
            train: TrainConfig::sdxl(),
            solver_order: 2,
            prediction_type: PredictionType::Epsilon,
            solver_type: SolverType::Midpoint,
            lower_order_final: true,
            euler_at_final: false,
            use_karras_sigmas: karras,
            final_sigmas_type: FinalSigmas::Zero,
            lambda_min_clipped: f64::NEG_INFINITY,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 1,
        }
    }

    pub fn from_reader(r: &Reader<'_>) -> Result<Self, EngineError> {
        const CLASS: &str = "DPMSolverMultistepScheduler";
        // diffusers maps "deis" to dpmsolver++ and the UniPC solver types to midpoint.
        let algorithm = r.choice(
            "algorithm_type",
            "dpmsolver++",
            &[
                "dpmsolver++",
                "deis",
                "dpmsolver",
                "sde-dpmsolver",
                "sde-dpmsolver++",
            ],
        )?;
        if algorithm != "dpmsolver++" && algorithm != "deis" {
            let why = if algorithm.starts_with("sde") {
                "the SDE variants draw noise inside the multistep update and are not implemented"
            } else {
                "only the data-prediction solver dpmsolver++ is implemented"
            };
            return Err(r.err(&format!("algorithm_type = {algorithm:?} is not supported: {why}")));
        }
        let solver_type = match r.choice(
            "solver_type",
            "midpoint",
            &["midpoint", "heun", "logrho", "bh1", "bh2"],
        )? {
            "heun" => SolverType::Heun,
            _ => SolverType::Midpoint,
        };
        let solver_order = r.i64("solver_order", 2)?;
        if !(1..=3).contains(&solver_order) {
            return Err(r.err(&format!(
                "solver_order = {solver_order} is not supported (1, 2 or 3)"
            )));
        }
        r.must_be_false("thresholding", CLASS)?;
        r.must_be_false("use_exponential_sigmas", CLASS)?;
        r.must_be_false("use_beta_sigmas", CLASS)?;
        r.must_be_false("use_lu_lambdas", CLASS)?;
        r.must_be_false("use_flow_sigmas", CLASS)?;
        r.must_be_false("use_dynamic_shifting", CLASS)?;
        if let Some(v) = r.get("variance_type") {
            return Err(r.err(&format!("variance_type = {v} is not supported (only null)")));
        }
        Ok(Self {
            train: TrainConfig::from_reader(r)?,
            solver_order: solver_order as usize,
            prediction_type: discrete::prediction_from_reader(r, &["epsilon", "v_prediction", "sample"])?,
            solver_type,
            lower_order_final: r.bool("lower_order_final", true)?,
            euler_at_final: r.bool("euler_at_final", false)?,
            use_karras_sigmas: r.bool("use_karras_sigmas", false)?,
            final_sigmas_type: discrete::final_sigmas_from_reader(r)?,
            lambda_min_clipped: r.f64("lambda_min_clipped", f64::NEG_INFINITY)?,
            timestep_spacing: discrete::spacing_from_reader(r)?,
            steps_offset: r.i64("steps_offset", 0)?,
        })
    }
}

/// diffusers' `DPMSolverMultistepScheduler` with `algorithm_type = "dpmsolver++"` (DPM++ 2M for
/// `solver_order = 2`): `solver_type` midpoint and heun, `solver_order` 1 to 3,
/// `lower_order_final`, `euler_at_final`, `use_karras_sigmas`, `final_sigmas_type` zero and
/// sigma_min, `lambda_min_clipped`, every `timestep_spacing`, `steps_offset`, `beta_schedule`,
/// prediction types epsilon, v_prediction and sample. Not taken (config errors): the SDE and
/// noise-prediction variants, thresholding, exponential/beta/lu/flow sigmas.
///
/// State: the previous data predictions (`model_outputs`) and `lower_order_nums`; steps must
/// run in order (a checkpoint records the next step).
pub struct DpmSolverMultistepScheduler {
    config: DpmSolverMultistepConfig,
    train: Train,
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    /// The last `solver_order` data predictions, oldest first (`model_outputs` in diffusers).
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    next_step: usize,
}

/// `(alpha_t, sigma_t)` of a sigma: `1 / sqrt(sigma^2 + 1)` and `sigma * alpha_t`, float32.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// `lambda = log(alpha_t) - log(sigma_t)` with torch's float32 log.
fn lambda(alpha: f32, sigma: f32) -> Result<f32, EngineError> {
    Ok(torch_log(alpha)? - torch_log(sigma)?)
}

impl DpmSolverMultistepScheduler {
    pub fn new(config: DpmSolverMultistepConfig) -> Result<Self, EngineError> {
        let train = Train::new(&config.train)?;
        let order = config.solver_order;
        Ok(Self {
            config,
            train,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            model_outputs: (0..order).map(|_| None).collect(),
            lower_order_nums: 0,
            next_step: 0,
        })
    }

    /// DPM++ 2M (Karras when `karras`) with SDXL's betas.
    pub fn sdxl(karras: bool) -> Result<Self, EngineError> {
        Self::new(DpmSolverMultistepConfig::sdxl(karras))
    }

    pub fn config(&self) -> &DpmSolverMultistepConfig {
        &self.config
    }

    /// `num_train_timesteps - searchsorted(flip(lambda_t), lambda_min_clipped)`.
    fn last_timestep(&self) -> Result<i64, EngineError> {
        let ntt = self.config.train.num_train_timesteps as i64;
        if self.config.lambda_min_clipped == f64::NEG_INFINITY {
            return Ok(ntt);
        }
        let ac = &self.train.alphas_cumprod;
        let lambda_t = ac
            .f_sqrt()?
            .f_log()?
            .f_sub(&ac.f_rsub_scalar(1)?.f_sqrt()?.f_log()?)?;
        let idx = Tensor::f_searchsorted_scalar(
            &lambda_t.f_flip([0])?,
            self.config.lambda_min_clipped,
            false,
            false,
            "left",
            None::<Tensor>,
        )?;
        Ok(ntt - idx.f_int64_value(&[])?)
    }

    /// The integer timesteps before the Karras conversion.
    fn spaced_timesteps(&self, steps: usize) -> Result<Vec<i64>, EngineError> {
        let c = &self.config;
        let last = self.last_timestep()?;
        Ok(match c.timestep_spacing {
            // np.linspace(0, last - 1, steps + 1).round()[::-1][:-1]
            TimestepSpacing::Linspace => {
                let v = numpy::linspace(0.0, (last - 1) as f64, steps + 1);
                v[1..].iter().rev().map(|&t| numpy::round(t) as i64).collect()
            }
            // (np.arange(0, steps + 1) * (last // (steps + 1))).round()[::-1][:-1] + steps_offset
            TimestepSpacing::Leading => {
                let ratio = last.div_euclid(steps as i64 + 1);
                (1..=steps as i64)
                    .rev()
                    .map(|i| i * ratio + c.steps_offset)
                    .collect()
            }
            // np.arange(last, 0, -num_train_timesteps / steps).round() - 1
            TimestepSpacing::Trailing => {
                let ratio = c.train.num_train_timesteps as f64 / steps as f64;
                numpy::arange_f64(last as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|t| numpy::round(t) as i64 - 1)
                    .collect()
            }
        })
    }

    fn convert_model_output(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        step_index: usize,
    ) -> Result<Tensor, EngineError> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step_index]);
        Ok(match self.config.prediction_type {
            // (sample - sigma_t * model_output) / alpha_t
            PredictionType::Epsilon => sample
                .f_sub(&model_output.f_mul(&scalar(sigma_t))?)?
                .f_div(&scalar(alpha_t))?,
            PredictionType::Sample => model_output.shallow_clone(),
            // alpha_t * sample - sigma_t * model_output
            PredictionType::VPrediction => sample
                .f_mul(&scalar(alpha_t))?
                .f_sub(&model_output.f_mul(&scalar(sigma_t))?)?,
        })
    }

    fn first_order(&self, m0: &Tensor, sample: &Tensor, i: usize) -> Result<Tensor, EngineError> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[i]);
        let h = lambda(alpha_t, sigma_t)? - lambda(alpha_s, sigma_s)?;
        // sigma_t / sigma_s * sample - alpha_t * (exp(-h) - 1) * m0
        let a = sigma_t / sigma_s;
        let b = alpha_t * (torch_exp(-h)? - 1.0);
        Ok(sample.f_mul(&scalar(a))?.f_sub(&m0.f_mul(&scalar(b))?)?)
    }

    fn second_order(
        &self,
        m0: &Tensor,
        m1: &Tensor,
        sample: &Tensor,
        i: usize,
    ) -> Result<Tensor, EngineError> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
        let lambda_t = lambda(alpha_t, sigma_t)?;
        let lambda_s0 = lambda(alpha_s0, sigma_s0)?;
        let lambda_s1 = lambda(alpha_s1, sigma_s1)?;
        let (h, h_0) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1);
        let r0 = h_0 / h;
        // D1 = 1.0 / r0 * (m0 - m1)
        let d1 = m0.f_sub(m1)?.f_mul(&scalar(1.0 / r0))?;
        let e = torch_exp(-h)? - 1.0;
        let a = sigma_t / sigma_s0;
        let b = alpha_t * e;
        let x = sample.f_mul(&scalar(a))?.f_sub(&m0.f_mul(&scalar(b))?)?;
        Ok(match self.config.solver_type {
            // - 0.5 * (alpha_t * (exp(-h) - 1)) * D1
            SolverType::Midpoint => x.f_sub(&d1.f_mul(&scalar(0.5 * b))?)?,
            // + alpha_t * ((exp(-h) - 1) / h + 1) * D1
            SolverType::Heun => x.f_add(&d1.f_mul(&scalar(alpha_t * (e / h + 1.0)))?)?,
        })
    }

    fn third_order(
        &self,
        m0: &Tensor,
        m1: &Tensor,
        m2: &Tensor,
        sample: &Tensor,
        i: usize,
    ) -> Result<Tensor, EngineError> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
        let (alpha_s2, sigma_s2) = alpha_sigma(self.sigmas[i - 2]);
        let lambda_t = lambda(alpha_t, sigma_t)?;
        let lambda_s0 = lambda(alpha_s0, sigma_s0)?;
        let lambda_s1 = lambda(alpha_s1, sigma_s1)?;
        let lambda_s2 = lambda(alpha_s2, sigma_s2)?;
        let (h, h_0, h_1) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2);
        let (r0, r1) = (h_0 / h, h_1 / h);
        let d1_0 = m0.f_sub(m1)?.f_mul(&scalar(1.0 / r0))?;
        let d1_1 = m1.f_sub(m2)?.f_mul(&scalar(1.0 / r1))?;
        let diff = d1_0.f_sub(&d1_1)?;
        // D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1); D2 = 1.0 / (r0 + r1) * (D1_0 - D1_1)
        let d1 = d1_0.f_add(&diff.f_mul(&scalar(r0 / (r0 + r1)))?)?;
        let d2 = diff.f_mul(&scalar(1.0 / (r0 + r1)))?;
        let e = torch_exp(-h)? - 1.0;
        let a = sigma_t / sigma_s0;
        let b = alpha_t * e;
        let c = alpha_t * (e / h + 1.0);
        let d = alpha_t * ((e + h) / (h * h) - 0.5);
        Ok(sample
            .f_mul(&scalar(a))?
            .f_sub(&m0.f_mul(&scalar(b))?)?
            .f_add(&d1.f_mul(&scalar(c))?)?
            .f_sub(&d2.f_mul(&scalar(d))?)?)
    }

    /// `model_outputs[k]` on `device`.
    fn output(&self, k: usize, device: Device) -> Result<Tensor, EngineError> {
        let t = self.model_outputs[k].as_ref().ok_or_else(|| {
            EngineError::InvalidRequest("scheduler: DPM-Solver is missing a previous model output".into())
        })?;
        Ok(t.f_to_device(device)?)
    }
}

impl Scheduler for DpmSolverMultistepScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::DpmSolverMultistep
    }

    fn set_timesteps(&mut self, steps: usize, _image_seq_len: Option<i64>) -> Result<(), EngineError> {
        if steps == 0 {
            return Err(EngineError::InvalidRequest(
                "scheduler: steps must be at least 1".into(),
            ));
        }
        let c = &self.config;
        let timesteps = self.spaced_timesteps(steps)?;
        let (timesteps, mut sigmas): (Vec<f32>, Vec<f32>) = if c.use_karras_sigmas {
            // The train sigmas flipped: in_sigmas[-1] is the smallest, in_sigmas[0] the largest.
            let n = self.train.sigmas.len();
            let s = numpy::karras(
                self.train.sigmas[0] as f64,
                self.train.sigmas[n - 1] as f64,
                steps,
            );
            let t: Vec<f64> = s
                .iter()
                .map(|&x| numpy::sigma_to_t(x, &self.train.log_sigmas))
                .collect();
            let t = if matches!(c.train.beta_schedule, discrete::BetaSchedule::SquaredcosCapV2) {
                t
            } else {
                t.into_iter().map(numpy::round).collect()
            };
            // torch.from_numpy(timesteps).to(torch.int64) truncates.
            (
                t.into_iter().map(|x| x as i64 as f32).collect(),
                s.into_iter().map(|x| x as f32).collect(),
            )
        } else {
            let t64: Vec<f64> = timesteps.iter().map(|&t| t as f64).collect();
            let s = self.train.interp_sigmas(&t64);
            (
                timesteps.iter().map(|&t| t as f32).collect(),
                s.into_iter().map(|x| x as f32).collect(),
            )
        };
        sigmas.push(self.train.final_sigma(c.final_sigmas_type));
        self.timesteps = timesteps;
        self.sigmas = sigmas;
        self.model_outputs = (0..c.solver_order).map(|_| None).collect();
        self.lower_order_nums = 0;
        self.next_step = 0;
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor, EngineError> {
        check_step(step_index, self.num_steps())?;
        Ok(sample.shallow_clone())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: Option<&Tensor>,
    ) -> Result<Tensor, EngineError> {
        let n = self.num_steps();
        check_step(step_index, n)?;
        if step_index != self.next_step {
            return Err(EngineError::InvalidRequest(format!(
                "scheduler: DPM-Solver steps run in order: expected step {}, got {step_index} \
                 (restore the state saved after step {step_index} to resume there)",
                self.next_step
            )));
        }
        let c = &self.config;
        let order = c.solver_order;
        let lower_order_final = step_index == n - 1
            && (c.euler_at_final
                || (c.lower_order_final && n < 15)
                || c.final_sigmas_type == FinalSigmas::Zero);
        let lower_order_second = step_index + 2 == n && c.lower_order_final && n < 15;
        let converted = self.convert_model_output(model_output, sample, step_index)?;
        self.model_outputs.rotate_left(1);
        self.model_outputs[order - 1] = Some(converted.shallow_clone());
        let sample = sample.f_to_kind(Kind::Float)?;
        let dev = sample.device();
        let prev = if order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order(&converted, &sample, step_index)?
        } else if order == 2 || self.lower_order_nums < 2 || lower_order_second {
            let m1 = self.output(order - 2, dev)?;
            self.second_order(&converted, &m1, &sample, step_index)?
        } else {
            let (m1, m2) = (self.output(order - 2, dev)?, self.output(order - 3, dev)?);
            self.third_order(&converted, &m1, &m2, &sample, step_index)?
        };
        if self.lower_order_nums < order {
            self.lower_order_nums += 1;
        }
        self.next_step = step_index + 1;
        Ok(prev.f_to_kind(converted.kind())?)
    }

    /// `next_step`, `lower_order_nums`, then `model_outputs[1..]` (the oldest is never read
    /// again: the next step shifts it out).
    fn carries_tensors(&self) -> bool {
        self.config.solver_order > 1
    }

    fn state_bytes(&self) -> Result<Vec<u8>, EngineError> {
        let mut w = StateWriter::new(self.kind(), self.num_steps());
        w.u32(self.config.solver_order);
        w.u32(self.next_step);
        w.u32(self.lower_order_nums);
        for t in &self.model_outputs[1..] {
            w.tensor(t.as_ref())?;
        }
        Ok(w.finish())
    }

    fn restore_state(&mut self, bytes: &[u8]) -> Result<(), EngineError> {
        let mut r = StateReader::new(bytes, self.kind(), self.num_steps())?;
        let order = r.u32()?;
        if order != self.config.solver_order {
            return Err(EngineError::BadCheckpoint(format!(
                "scheduler state: written with solver_order {order}, this scheduler has {}",
                self.config.solver_order
            )));
        }
        let next_step = r.u32()?;
        let lower_order_nums = r.u32()?;
        if next_step > self.num_steps() || lower_order_nums > order {
            return Err(EngineError::BadCheckpoint(
                "scheduler state: counters out of range".into(),
            ));
        }
        let mut outputs = vec![None];
        for _ in 1..order {
            outputs.push(r.tensor()?);
        }
        r.finish()?;
        self.model_outputs = outputs;
        self.next_step = next_step;
        self.lower_order_nums = lower_order_nums;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader_err(json: &str) -> String {
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        DpmSolverMultistepConfig::from_reader(&Reader::new(&v, "dpm.json").unwrap())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn sde_and_unsupported_options_are_config_errors_naming_key_and_value() {
        let e = reader_err(r#"{"algorithm_type": "sde-dpmsolver++"}"#);
        assert!(
            e.contains("algorithm_type = \"sde-dpmsolver++\"") && e.contains("SDE"),
            "{e}"
        );
        let e = reader_err(r#"{"algorithm_type": "dpmsolver"}"#);
        assert!(e.contains("algorithm_type = \"dpmsolver\""), "{e}");
        let e = reader_err(r#"{"solver_order": 4}"#);
        assert!(e.contains("solver_order = 4"), "{e}");
        let e = reader_err(r#"{"thresholding": true}"#);
        assert!(e.contains("thresholding = true"), "{e}");
        let e = reader_err(r#"{"final_sigmas_type": "max"}"#);
        assert!(e.contains("final_sigmas_type = \"max\""), "{e}");
        let e = reader_err(r#"{"timestep_spacing": "uniform"}"#);
        assert!(e.contains("timestep_spacing = \"uniform\""), "{e}");
    }

    #[test]
    fn deis_and_unipc_solver_types_map_like_diffusers() {
        let v: serde_json::Value =
            serde_json::from_str(r#"{"algorithm_type": "deis", "solver_type": "bh2"}"#).unwrap();
        let c = DpmSolverMultistepConfig::from_reader(&Reader::new(&v, "x").unwrap()).unwrap();
        assert_eq!(c.solver_type, SolverType::Midpoint);
    }

    #[test]
    fn steps_must_run_in_order() {
        let mut s = DpmSolverMultistepScheduler::sdxl(true).unwrap();
        s.set_timesteps(5, None).unwrap();
        let x = Tensor::ones([1, 4, 2, 2], (Kind::Float, Device::Cpu));
        let e = s.step(&x, 1, &x, None).unwrap_err().to_string();
        assert!(e.contains("expected step 0"), "{e}");
    }
}
