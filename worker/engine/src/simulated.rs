//! The simulated engine: a stand-in with the real engine's interface and timing shape, used by the
//! fleet's load and chaos tests where thousands of jobs must run on CPUs. It is named as simulated
//! everywhere it appears (registration, job results, logs) and never serves as the real model.
//!
//! It sleeps `step_ms` per denoising step and draws a deterministic image from the seed: the same
//! request always yields the same bytes.

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{
    Control, Engine, EngineError, EngineInfo, GenerateRequest, GeneratedImage, StageTimings,
    StepEvent,
};

/// Settings of the simulated engine.
#[derive(Debug, Clone)]
pub struct SimulatedConfig {
    /// Milliseconds slept per denoising step.
    pub step_ms: u64,
    /// Models it pretends to serve.
    pub models: Vec<String>,
    /// Version label advertised for every model.
    pub version: String,
}

impl Default for SimulatedConfig {
    fn default() -> Self {
        Self {
            step_ms: 20,
            models: vec!["flux-dev".into(), "flux-schnell".into()],
            version: "sim-1".into(),
        }
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct SimulatedEngine {
    config: SimulatedConfig,
}

impl SimulatedEngine {
    pub fn new(config: SimulatedConfig) -> Self {
        Self { config }
    }

    /// The deterministic image for a request: a seeded colour gradient with seeded noise. The
    /// prompt also feeds the seed so different prompts give different images.
    pub fn render(request: &GenerateRequest) -> Vec<u8> {
        let mut seed = request.seed;
        for b in request.prompt.bytes() {
            seed = seed.rotate_left(5) ^ u64::from(b);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let base: [f32; 3] = [rng.random(), rng.random(), rng.random()];
        let tint: [f32; 3] = [rng.random(), rng.random(), rng.random()];
        let (w, h) = (request.width as usize, request.height as usize);
        let mut rgb = vec![0u8; w * h * 3];
        for y in 0..h {
            for x in 0..w {
                let fx = x as f32 / w.max(1) as f32;
                let fy = y as f32 / h.max(1) as f32;
                let noise: f32 = rng.random::<f32>() * 0.08;
                for c in 0..3 {
                    let v = base[c] * (1.0 - fx) + tint[c] * fy + noise;
                    rgb[(y * w + x) * 3 + c] = (v.clamp(0.0, 1.0) * 255.0) as u8;
                }
            }
        }
        rgb
    }
}

impl Engine for SimulatedEngine {
    fn info(&self) -> EngineInfo {
        EngineInfo {
            kind: "simulated".into(),
            models: self.config.models.clone(),
            model_versions: self
                .config
                .models
                .iter()
                .map(|m| format!("{m}@{}", self.config.version))
                .collect(),
            devices: vec!["cpu".into()],
            parallel_degree: 1,
            note: format!(
                "SIMULATED engine ({} ms/step, no model)",
                self.config.step_ms
            ),
        }
    }

    fn generate(
        &mut self,
        request: &GenerateRequest,
        on_step: &mut dyn FnMut(StepEvent) -> Control,
    ) -> Result<GeneratedImage, EngineError> {
        if !self.config.models.iter().any(|m| m == &request.model) {
            return Err(EngineError::InvalidRequest(format!(
                "simulated engine does not serve model {:?}",
                request.model
            )));
        }
        if request.steps == 0 || request.width == 0 || request.height == 0 {
            return Err(EngineError::InvalidRequest(
                "steps, width and height must be positive".into(),
            ));
        }
        let start = Instant::now();
        for step in 1..=request.steps {
            std::thread::sleep(Duration::from_millis(self.config.step_ms));
            if on_step(StepEvent {
                step,
                total: request.steps,
                elapsed: start.elapsed(),
            }) == Control::Cancel
            {
                return Err(EngineError::Cancelled { step });
            }
        }
        let denoise_ms = start.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let rgb = Self::render(request);
        Ok(GeneratedImage {
            width: request.width,
            height: request.height,
            rgb,
            timings: StageTimings {
                encode_ms: 0.0,
                denoise_ms,
                decode_ms: t.elapsed().as_secs_f64() * 1e3,
                peak_memory_bytes: None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(seed: u64) -> GenerateRequest {
        GenerateRequest {
            model: "flux-dev".into(),
            prompt: "a lighthouse".into(),
            negative_prompt: None,
            width: 64,
            height: 32,
            steps: 3,
            guidance: 3.5,
            seed,
        }
    }

    #[test]
    fn same_seed_gives_identical_image_and_different_seed_differs() {
        let mut e = SimulatedEngine::new(SimulatedConfig {
            step_ms: 0,
            ..Default::default()
        });
        let a = e.generate(&request(7), &mut |_| Control::Continue).unwrap();
        let b = e.generate(&request(7), &mut |_| Control::Continue).unwrap();
        let c = e.generate(&request(8), &mut |_| Control::Continue).unwrap();
        assert_eq!(a.rgb, b.rgb);
        assert_ne!(a.rgb, c.rgb);
        assert_eq!(a.rgb.len(), 64 * 32 * 3);
        let png = a.to_png().unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }

    #[test]
    fn reports_every_step_and_stops_when_cancelled() {
        let mut e = SimulatedEngine::new(SimulatedConfig {
            step_ms: 0,
            ..Default::default()
        });
        let mut seen = Vec::new();
        e.generate(&request(1), &mut |ev| {
            seen.push(ev.step);
            Control::Continue
        })
        .unwrap();
        assert_eq!(seen, vec![1, 2, 3]);
        let err = e.generate(&request(1), &mut |ev| {
            if ev.step == 2 {
                Control::Cancel
            } else {
                Control::Continue
            }
        });
        assert!(matches!(err, Err(EngineError::Cancelled { step: 2 })));
    }

    #[test]
    fn unknown_model_is_an_invalid_request() {
        let mut e = SimulatedEngine::new(SimulatedConfig {
            step_ms: 0,
            ..Default::default()
        });
        let mut r = request(1);
        r.model = "sdxl".into();
        assert!(matches!(
            e.generate(&r, &mut |_| Control::Continue),
            Err(EngineError::InvalidRequest(_))
        ));
    }
}
