//! Builds the configured engine(s). A model directory is Flux.1 or SDXL as its
//! `model_index.json` says ([`Family::of_dir`]); without one the tiny random-weight Flux and SDXL
//! configs serve `flux-dev` and `sdxl-base`.

use std::path::Path;

use ditfleet_common::config::{Autotune, EngineChoice, SimFaults};
use ditfleet_engine::flux::{Pipeline, PipelineOptions};
use ditfleet_engine::models::Family;
use ditfleet_engine::models::sdxl::{self, SdxlPipeline};
use ditfleet_engine::parallel::rank::ParallelLeader;
use ditfleet_engine::parallel::resilient::{FactoryFn, LeaderFn};
use ditfleet_engine::parallel::{
    CommFactory, InjectedFault, NcclFactory, Plan, PlanTable, ResilientParallel, ThreadsFactory,
};
use ditfleet_engine::simulated::{SimulatedConfig, SimulatedEngine, SimulatedFaults};
use ditfleet_engine::{Engine, EngineError};
use tch::{Device, Kind};

/// Parses `cpu` / `cuda:N` (already validated by the config loader).
fn device(name: &str) -> Result<Device, EngineError> {
    match name {
        "cpu" => Ok(Device::Cpu),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .map(Device::Cuda)
            .ok_or_else(|| EngineError::InvalidRequest(format!("unknown device {other:?}"))),
    }
}

/// The device for the pipeline: the first configured one, else the first GPU, else the CPU.
fn pick_device(devices: Option<&[String]>) -> Result<Device, EngineError> {
    match devices.and_then(|d| d.first()) {
        Some(d) => device(d),
        None if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
        None => Ok(Device::Cpu),
    }
}

fn simulated(
    step_ms: u64,
    lora_apply_ms: u64,
    faults: &SimFaults,
    model: &str,
    version: &str,
    slots: u16,
) -> Vec<Box<dyn Engine>> {
    (0..slots.max(1))
        .map(|_| {
            Box::new(SimulatedEngine::new(SimulatedConfig {
                step_ms,
                models: vec![model.to_string()],
                version: version.to_string(),
                faults: SimulatedFaults {
                    oom: faults.oom,
                    device: faults.device,
                    bad_weights: faults.bad_weights,
                    panic: faults.panic,
                },
                lora_apply_ms,
                ..Default::default()
            })) as Box<dyn Engine>
        })
        .collect()
}

/// Engines for the worker's slots, each serving one model version: for the simulated engine one
/// per slot and model; one pipeline (or one multi-device parallel pipeline with `DITFLEET_PLAN`,
/// Flux only) for a real model (its weights are resident once; extra slots wait for it); without
/// a model directory, the tiny random-weight Flux and SDXL pipelines.
pub fn build(
    choice: &EngineChoice,
    slots: u16,
    devices: Option<&[String]>,
) -> Result<Vec<Box<dyn Engine>>, EngineError> {
    match choice {
        EngineChoice::Simulated {
            step_ms,
            load_ms,
            version,
            faults,
            models,
            lora_apply_ms,
        } => {
            // Stands for reading and verifying weights (start-up probe tests).
            std::thread::sleep(std::time::Duration::from_millis(*load_ms));
            Ok(models
                .iter()
                .flat_map(|m| simulated(*step_ms, *lora_apply_ms, faults, m, version, slots))
                .collect())
        }
        EngineChoice::Flux {
            model_dir,
            low_memory,
            plan: Some(plan),
            autotune,
            fault_gpu,
        } => {
            let family = match model_dir {
                Some(dir) => Family::of_dir(dir)?,
                None => Family::Flux,
            };
            Ok(vec![parallel(
                model_dir.as_deref(),
                family,
                *low_memory,
                plan,
                autotune,
                devices,
                *fault_gpu,
            )?])
        }
        EngineChoice::Flux { model_dir: None, .. } => {
            tracing::warn!(
                "no model directory (DITFLEET_MODEL_DIR / FLUX_MODEL_DIR): serving the TINY RANDOM-WEIGHT Flux and SDXL configs (not trained models; images are noise)"
            );
            tiny_random(0)
        }
        EngineChoice::Flux {
            model_dir: Some(dir),
            low_memory,
            plan: None,
            ..
        } => Ok(vec![load_model(dir, *low_memory, devices)?]),
    }
}

/// The tiny random-weight pipelines: Flux (`flux-dev`) and SDXL (`sdxl-base`), from one seed.
fn tiny_random(seed: u64) -> Result<Vec<Box<dyn Engine>>, EngineError> {
    Ok(vec![
        Box::new(Pipeline::tiny_random(seed)?),
        Box::new(SdxlPipeline::tiny_random(seed)?),
    ])
}

/// The model in `dir`: Flux.1 or SDXL, as its `model_index.json` says.
fn load_model(
    dir: &Path,
    low_memory: bool,
    devices: Option<&[String]>,
) -> Result<Box<dyn Engine>, EngineError> {
    Ok(match Family::of_dir(dir)? {
        Family::Flux => Box::new(load_flux(dir, low_memory, devices)?),
        Family::Sdxl => Box::new(load_sdxl(dir, low_memory, devices)?),
    })
}

fn kind_for(dev: Device) -> Kind {
    if dev.is_cuda() {
        Kind::BFloat16
    } else {
        Kind::Float
    }
}

fn load_flux(dir: &Path, low_memory: bool, devices: Option<&[String]>) -> Result<Pipeline, EngineError> {
    let dev = pick_device(devices)?;
    let mut options = PipelineOptions::new(dev, kind_for(dev));
    // A second configured device takes the text encoders.
    if let Some(second) = devices.and_then(|d| d.get(1)) {
        options.devices.text_encoders = device(second)?;
    }
    options.free_text_encoders = low_memory;
    Pipeline::load(dir, options)
}

/// SDXL on the first configured device (bf16 on a GPU, the VAE decoding in bf16; fp32 on the
/// CPU); a second configured device takes the text encoders.
fn load_sdxl(dir: &Path, low_memory: bool, devices: Option<&[String]>) -> Result<SdxlPipeline, EngineError> {
    let dev = pick_device(devices)?;
    let mut options = sdxl::PipelineOptions::new(dev, kind_for(dev));
    if let Some(second) = devices.and_then(|d| d.get(1)) {
        options.devices.text_encoders = device(second)?;
    }
    if low_memory {
        tracing::warn!("DITFLEET_LOW_MEMORY applies to Flux only: SDXL's text encoders stay resident");
    }
    SdxlPipeline::load(dir, options)
}

/// Engines serving `model@version`, for a hot swap. Simulated: any version (one engine per slot).
/// Real models: `tiny-random-<seed>` builds the tiny random-weight config of `model`'s family
/// (Flux for `flux-dev`, SDXL for `sdxl-base`); any other version is the checkpoint directory
/// `<model_root>/<version>` (Flux.1 or SDXL), which must hold `model`.
pub fn build_version(
    choice: &EngineChoice,
    model: &str,
    version: &str,
    slots: u16,
    devices: Option<&[String]>,
    model_root: Option<&Path>,
) -> Result<Vec<Box<dyn Engine>>, EngineError> {
    match choice {
        EngineChoice::Simulated {
            step_ms,
            faults,
            lora_apply_ms,
            ..
        } => Ok(simulated(*step_ms, *lora_apply_ms, faults, model, version, slots)),
        EngineChoice::Flux {
            low_memory,
            plan: Some(plan),
            autotune,
            fault_gpu,
            ..
        } => {
            let family = Family::of(model)
                .ok_or_else(|| EngineError::Load(format!("no engine serves model {model:?}")))?;
            let dir = match version.strip_prefix("tiny-random-") {
                Some(_) => None,
                None => Some(
                    model_root
                        .ok_or_else(|| {
                            EngineError::Load(format!(
                                "cannot load {model}@{version}: set DITFLEET_MODEL_ROOT (versions are <root>/<version>)"
                            ))
                        })
                        .and_then(|root| version_dir(root, version))?,
                ),
            };
            Ok(vec![parallel(
                dir.as_deref(),
                family,
                *low_memory,
                plan,
                autotune,
                devices,
                *fault_gpu,
            )?])
        }
        EngineChoice::Flux { low_memory, .. } => {
            let engine: Box<dyn Engine> = if let Some(seed) = version.strip_prefix("tiny-random-") {
                let seed = seed.parse::<u64>().map_err(|_| {
                    EngineError::Load(format!(
                        "version {version:?}: tiny-random-<seed> needs a numeric seed"
                    ))
                })?;
                match Family::of(model) {
                    Some(Family::Sdxl) => Box::new(SdxlPipeline::tiny_random(seed)?),
                    _ => Box::new(Pipeline::tiny_random(seed)?),
                }
            } else {
                let root = model_root.ok_or_else(|| {
                    EngineError::Load(format!(
                        "cannot load {model}@{version}: set DITFLEET_MODEL_ROOT (versions are <root>/<version>)"
                    ))
                })?;
                load_model(&version_dir(root, version)?, *low_memory, devices)?
            };
            let served = engine.info().models;
            if !served.iter().any(|m| m == model) {
                return Err(EngineError::Load(format!(
                    "{version} holds {}, not {model}",
                    served.join(", ")
                )));
            }
            Ok(vec![engine])
        }
    }
}

/// `<root>/<version>`: a version is one plain folder name under the model root, never a path
/// that climbs out of it.
fn version_dir(root: &Path, version: &str) -> Result<std::path::PathBuf, EngineError> {
    ditfleet_common::ident::join_within(root, "model version", &[version])
        .map_err(|e| EngineError::Load(e.to_string()))
}

/// The multi-device engine: `plan` over `devices` (default: every GPU), one leader pipeline per
/// data-parallel group (loaded from `model_dir`, or the tiny random-weight config), NCCL between
/// GPUs, the in-process threads backend between CPU "devices" (tests, demos). A failing device is
/// quarantined and the plan rebuilt on the others (`ResilientParallel`); `fault_gpu` injects a
/// failure for drills. Plan `auto`: every plan is measured on first start (or the table cached
/// for this node is loaded) and each job runs the fastest for its size.
fn parallel(
    model_dir: Option<&std::path::Path>,
    family: Family,
    low_memory: bool,
    plan: &str,
    autotune: &Autotune,
    devices: Option<&[String]>,
    fault_gpu: Option<(usize, u32, bool)>,
) -> Result<Box<dyn Engine>, EngineError> {
    let dir = model_dir.map(|d| d.to_path_buf());
    Ok(match family {
        Family::Flux => {
            let make_leader: LeaderFn<Pipeline> = Box::new(move |dev: Device| match &dir {
                Some(dir) => {
                    let mut o = PipelineOptions::new(dev, kind_for(dev));
                    o.free_text_encoders = low_memory;
                    Pipeline::load(dir, o)
                }
                None => {
                    tracing::warn!(
                        "no model directory (DITFLEET_MODEL_DIR / FLUX_MODEL_DIR): the parallel plan serves the TINY RANDOM-WEIGHT Flux config"
                    );
                    Pipeline::tiny_random(0)
                }
            });
            Box::new(parallel_engine(
                model_dir,
                make_leader,
                plan,
                autotune,
                devices,
                fault_gpu,
            )?)
        }
        Family::Sdxl => {
            let make_leader: LeaderFn<SdxlPipeline> = Box::new(move |dev: Device| match &dir {
                Some(dir) => SdxlPipeline::load(dir, sdxl::PipelineOptions::new(dev, kind_for(dev))),
                None => {
                    tracing::warn!(
                        "no model directory (DITFLEET_MODEL_DIR): the parallel plan serves the TINY RANDOM-WEIGHT SDXL config"
                    );
                    SdxlPipeline::tiny_random(0)
                }
            });
            Box::new(parallel_engine(
                model_dir,
                make_leader,
                plan,
                autotune,
                devices,
                fault_gpu,
            )?)
        }
    })
}

/// [`parallel`] for one family's leaders.
fn parallel_engine<L: ParallelLeader + Engine>(
    model_dir: Option<&std::path::Path>,
    make_leader: LeaderFn<L>,
    plan: &str,
    autotune: &Autotune,
    devices: Option<&[String]>,
    fault_gpu: Option<(usize, u32, bool)>,
) -> Result<ResilientParallel<L>, EngineError> {
    let auto = plan.trim() == "auto";
    let plan: Plan = if auto {
        Plan::SINGLE
    } else {
        plan.parse()
            .map_err(|e| EngineError::InvalidRequest(format!("DITFLEET_PLAN: {e}")))?
    };
    let devs: Vec<Device> = match devices {
        Some(d) => d.iter().map(|x| device(x)).collect::<Result<_, _>>()?,
        None => (0..tch::Cuda::device_count() as usize)
            .map(Device::Cuda)
            .collect(),
    };
    if devs.len() < plan.world() {
        return Err(EngineError::InvalidRequest(format!(
            "DITFLEET_PLAN {plan} needs {} devices, DITFLEET_DEVICES gives {}",
            plan.world(),
            devs.len()
        )));
    }
    let cuda = devs.iter().all(|d| d.is_cuda());
    if !cuda && !devs.iter().all(|d| *d == Device::Cpu) {
        return Err(EngineError::InvalidRequest(
            "a parallel plan needs DITFLEET_DEVICES all cuda:N or all cpu".into(),
        ));
    }
    if model_dir.is_none() && cuda {
        return Err(EngineError::InvalidRequest(
            "a parallel plan on GPUs needs a model directory (DITFLEET_MODEL_DIR; the tiny random-weight config is CPU-only)".into(),
        ));
    }
    let make_factory: FactoryFn = Box::new(move |devs: &[Device]| -> Box<dyn CommFactory + Send> {
        match NcclFactory::from_devices(devs) {
            Ok(f) if cuda => Box::new(f),
            _ => Box::new(ThreadsFactory::cpu()),
        }
    });
    let fault = fault_gpu.map(|(slot, step, hang)| InjectedFault { slot, step, hang });
    let model_id = match model_dir {
        Some(d) => d.display().to_string(),
        None => "tiny-random".to_string(),
    };
    let node = PlanTable::node(&describe_devices(&devs), &model_id);
    let mut engine = ResilientParallel::new(devs, plan, make_leader, make_factory, fault)?;
    if auto {
        let table = match PlanTable::load(&autotune.cache, &node)? {
            Some(t) => {
                tracing::info!(path = %autotune.cache.display(), node = %node, sizes = t.sizes.len(), "plan table loaded");
                t
            }
            None => {
                let model = engine
                    .info()
                    .models
                    .first()
                    .cloned()
                    .unwrap_or_else(|| "flux-dev".into());
                tracing::info!(path = %autotune.cache.display(), node = %node, sizes = ?autotune.sizes, "measuring every parallel plan on this node (first start)");
                let t = ditfleet_engine::parallel::autotune(
                    &mut engine,
                    &model,
                    &node,
                    &autotune.sizes,
                    1,
                    3,
                    &mut |p| match (&p.result.ms_per_step, &p.result.error) {
                        (Some(ms), _) => {
                            tracing::info!(index = p.index, total = p.total, width = p.width, height = p.height, plan = %p.result.plan, ms_per_step = format!("{ms:.1}"), "plan measured")
                        }
                        (None, e) => {
                            tracing::warn!(index = p.index, total = p.total, width = p.width, height = p.height, plan = %p.result.plan, error = ?e, "plan failed at this size")
                        }
                    },
                )?;
                if let Err(e) = t.save(&autotune.cache) {
                    tracing::warn!(error = %e, "plan table not cached; it is measured again on the next start");
                }
                t
            }
        };
        for s in &table.sizes {
            if let Some(best) = table.best(s.width, s.height, usize::MAX, false) {
                tracing::info!(width = s.width, height = s.height, plan = %best, "autotuned plan");
            }
        }
        engine.set_table(Some(table));
    }
    Ok(engine)
}

/// `2x cuda (NVIDIA H200)` / `4x cpu`: what the plan timings depend on.
fn describe_devices(devs: &[Device]) -> String {
    let names: Vec<String> = devs
        .iter()
        .map(|d| match d {
            Device::Cuda(i) => {
                ditfleet_engine::parallel::nccl::cuda_product_name(*i).unwrap_or_else(|| "cuda".into())
            }
            _ => "cpu".into(),
        })
        .collect();
    let mut uniq = names.clone();
    uniq.dedup();
    if uniq.len() == 1 {
        format!("{}x {}", names.len(), uniq[0])
    } else {
        names.join(" + ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choice(model_dir: Option<&Path>, plan: Option<&str>) -> EngineChoice {
        EngineChoice::Flux {
            model_dir: model_dir.map(Path::to_path_buf),
            low_memory: false,
            plan: plan.map(str::to_string),
            autotune: Autotune {
                cache: std::env::temp_dir().join("ditfleet-engines-test-plans.json"),
                sizes: vec![(256, 256)],
            },
            fault_gpu: None,
        }
    }

    fn versions(engines: &[Box<dyn Engine>]) -> Vec<String> {
        engines.iter().flat_map(|e| e.info().model_versions).collect()
    }

    /// The committed SDXL golden folder (a tiny but complete diffusers SDXL pipeline).
    fn sdxl_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("engine/tests/goldens/sdxl_pipeline_small/pipeline")
    }

    #[test]
    fn without_a_model_dir_the_tiny_random_engines_serve_flux_dev_and_sdxl_base() {
        let engines = build(&choice(None, None), 1, None).unwrap();
        assert_eq!(
            versions(&engines),
            vec!["flux-dev@tiny-random-0", "sdxl-base@tiny-random-0"]
        );
    }

    #[test]
    fn a_model_dir_is_loaded_as_the_family_its_model_index_names() {
        let engines = build(&choice(Some(&sdxl_dir()), None), 1, Some(&["cpu".into()])).unwrap();
        assert_eq!(versions(&engines), vec!["sdxl-base@pipeline"]);
        assert_eq!(engines[0].info().kind, "sdxl");
    }

    #[test]
    fn a_version_swap_builds_the_tiny_config_or_folder_of_the_models_family() {
        let c = choice(None, None);
        let e = build_version(&c, "sdxl-base", "tiny-random-3", 1, None, None).unwrap();
        assert_eq!(versions(&e), vec!["sdxl-base@tiny-random-3"]);
        let e = build_version(&c, "flux-dev", "tiny-random-3", 1, None, None).unwrap();
        assert_eq!(versions(&e), vec!["flux-dev@tiny-random-3"]);
        let root = sdxl_dir().parent().unwrap().to_path_buf();
        let cpu = ["cpu".to_string()];
        let e = build_version(&c, "sdxl-base", "pipeline", 1, Some(&cpu), Some(&root)).unwrap();
        assert_eq!(versions(&e), vec!["sdxl-base@pipeline"]);
        let err = build_version(&c, "flux-dev", "pipeline", 1, Some(&cpu), Some(&root))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("holds sdxl-base, not flux-dev"), "{err}");
    }

    #[test]
    fn an_sdxl_parallel_plan_serves_sdxl_base_and_a_flux_only_plan_is_refused_with_the_reason() {
        let cpus = ["cpu".to_string(), "cpu".to_string()];
        let mut e = build_version(
            &choice(None, Some("cfg=2")),
            "sdxl-base",
            "tiny-random-0",
            1,
            Some(&cpus),
            None,
        )
        .unwrap();
        assert_eq!(e[0].info().models, vec!["sdxl-base".to_string()]);
        assert_eq!(e[0].info().parallel_degree, 2);
        let request = ditfleet_engine::GenerateRequest {
            model: "sdxl-base".into(),
            prompt: "a lighthouse".into(),
            negative_prompt: None,
            width: 64,
            height: 64,
            steps: 2,
            guidance: 5.0,
            true_cfg_scale: 1.0,
            plan: None,
            seed: 1,
            scheduler: None,
            loras: Vec::new(),
        };
        let image = e[0]
            .generate(&request, &mut |_| ditfleet_engine::Control::Continue)
            .unwrap();
        assert_eq!(image.timings.plan.as_deref(), Some("cfg=2"));
        // Ulysses splits attention heads: a UNet has no such split.
        let err = build(&choice(Some(&sdxl_dir()), Some("ulysses=2")), 1, Some(&cpus))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("ulysses"), "{err}");
    }
}
