//! Builds the configured engine(s).

use std::path::Path;

use ditfleet_common::config::{Autotune, EngineChoice, SimFaults};
use ditfleet_engine::flux::{Pipeline, PipelineOptions};
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
                },
            })) as Box<dyn Engine>
        })
        .collect()
}

/// Engines for the worker's slots, each serving one model version: for the simulated engine one
/// per slot and model; one pipeline (or one multi-device parallel pipeline with `DITFLEET_PLAN`)
/// for a real model (its weights are resident once; extra slots wait for it).
pub fn build(
    choice: &EngineChoice,
    slots: u16,
    devices: Option<&[String]>,
) -> Result<Vec<Box<dyn Engine>>, EngineError> {
    match choice {
        EngineChoice::Simulated {
            step_ms,
            version,
            faults,
        } => Ok(SimulatedConfig::default()
            .models
            .iter()
            .flat_map(|m| simulated(*step_ms, faults, m, version, slots))
            .collect()),
        EngineChoice::Flux {
            model_dir,
            low_memory,
            plan: Some(plan),
            autotune,
            fault_gpu,
        } => Ok(vec![Box::new(parallel(
            model_dir.as_deref(),
            *low_memory,
            plan,
            autotune,
            devices,
            *fault_gpu,
        )?)]),
        EngineChoice::Flux { model_dir: None, .. } => {
            tracing::warn!(
                "FLUX_MODEL_DIR is unset: serving the TINY RANDOM-WEIGHT Flux config (not a trained model; images are noise)"
            );
            Ok(vec![Box::new(Pipeline::tiny_random(0)?)])
        }
        EngineChoice::Flux {
            model_dir: Some(dir),
            low_memory,
            plan: None,
            ..
        } => Ok(vec![Box::new(load_flux(dir, *low_memory, devices)?)]),
    }
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

/// Engines serving `model@version`, for a hot swap. Simulated: any version (one engine per slot).
/// Flux: `tiny-random-<seed>` builds the tiny random-weight config; any other version is the
/// checkpoint directory `<model_root>/<version>`, which must hold `model`.
pub fn build_version(
    choice: &EngineChoice,
    model: &str,
    version: &str,
    slots: u16,
    devices: Option<&[String]>,
    model_root: Option<&Path>,
) -> Result<Vec<Box<dyn Engine>>, EngineError> {
    match choice {
        EngineChoice::Simulated { step_ms, faults, .. } => {
            Ok(simulated(*step_ms, faults, model, version, slots))
        }
        EngineChoice::Flux {
            low_memory,
            plan: Some(plan),
            autotune,
            fault_gpu,
            ..
        } => {
            let dir = match version.strip_prefix("tiny-random-") {
                Some(_) => None,
                None => Some(
                    model_root
                        .ok_or_else(|| {
                            EngineError::Load(format!(
                                "cannot load {model}@{version}: set DITFLEET_MODEL_ROOT (versions are <root>/<version>)"
                            ))
                        })?
                        .join(version),
                ),
            };
            Ok(vec![Box::new(parallel(
                dir.as_deref(),
                *low_memory,
                plan,
                autotune,
                devices,
                *fault_gpu,
            )?)])
        }
        EngineChoice::Flux { low_memory, .. } => {
            let pipeline = if let Some(seed) = version.strip_prefix("tiny-random-") {
                let seed = seed.parse::<u64>().map_err(|_| {
                    EngineError::Load(format!(
                        "version {version:?}: tiny-random-<seed> needs a numeric seed"
                    ))
                })?;
                Pipeline::tiny_random(seed)?
            } else {
                let root = model_root.ok_or_else(|| {
                    EngineError::Load(format!(
                        "cannot load {model}@{version}: set DITFLEET_MODEL_ROOT (versions are <root>/<version>)"
                    ))
                })?;
                load_flux(&root.join(version), *low_memory, devices)?
            };
            if pipeline.model != model {
                return Err(EngineError::Load(format!(
                    "{version} holds {}, not {model}",
                    pipeline.model
                )));
            }
            Ok(vec![Box::new(pipeline)])
        }
    }
}

/// The multi-device engine: `plan` over `devices` (default: every GPU), one leader pipeline per
/// data-parallel group (loaded from `model_dir`, or the tiny random-weight config), NCCL between
/// GPUs, the in-process threads backend between CPU "devices" (tests, demos). A failing device is
/// quarantined and the plan rebuilt on the others (`ResilientParallel`); `fault_gpu` injects a
/// failure for drills. Plan `auto`: every plan is measured on first start (or the table cached
/// for this node is loaded) and each job runs the fastest for its size.
fn parallel(
    model_dir: Option<&std::path::Path>,
    low_memory: bool,
    plan: &str,
    autotune: &Autotune,
    devices: Option<&[String]>,
    fault_gpu: Option<(usize, u32, bool)>,
) -> Result<ResilientParallel, EngineError> {
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
            "a parallel plan on GPUs needs FLUX_MODEL_DIR (the tiny random-weight config is CPU-only)".into(),
        ));
    }
    let dir = model_dir.map(|d| d.to_path_buf());
    let make_leader: LeaderFn = Box::new(move |dev: Device| match &dir {
        Some(dir) => {
            let mut o = PipelineOptions::new(dev, kind_for(dev));
            o.free_text_encoders = low_memory;
            Pipeline::load(dir, o)
        }
        None => {
            tracing::warn!(
                "FLUX_MODEL_DIR is unset: the parallel plan serves the TINY RANDOM-WEIGHT Flux config"
            );
            Pipeline::tiny_random(0)
        }
    });
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
