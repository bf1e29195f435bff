//! Builds the configured engine(s). A model directory is Flux.1 or SDXL as its
//! `model_index.json` says ([`Family::of_dir`]); without one the tiny random-weight Flux and SDXL
//! configs serve `flux-dev` and `sdxl-base`.
//!
//! Precision (issue 20): each model version computes in `bf16` or `fp8` ([`Precision`]).
//! `DITFLEET_PRECISION` is the default of every model folder; a folder's [`VERSION_SETTINGS`]
//! file (`{"precision": "fp8"}`) overrides it for that version; `tiny-random-<seed>-fp8` is the
//! tiny Flux config in fp8. SDXL is bf16 only: asking for fp8 there is a load error.

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
use ditfleet_engine::{Engine, EngineError, Precision};
use tch::{Device, Kind};

/// The per-version settings file in a model version's folder (`<model_root>/<version>/`).
pub const VERSION_SETTINGS: &str = "ditfleet.json";

/// What a version folder's [`VERSION_SETTINGS`] may say; any other key is an error (a typo must
/// not silently load the version at the default precision).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionSettings {
    /// Overrides `DITFLEET_PRECISION` for this version.
    #[serde(default)]
    precision: Option<Precision>,
}

/// `DITFLEET_PRECISION` as the engine's type (the config loader has checked the word).
fn configured_precision(p: &str) -> Result<Precision, EngineError> {
    p.parse()
        .map_err(|e| EngineError::InvalidRequest(format!("DITFLEET_PRECISION: {e}")))
}

/// The precision of the model in `dir`: its [`VERSION_SETTINGS`] file's, else `default`. A file
/// that cannot be read or parsed is a load error naming it. `dir` is a configured model directory
/// or a version folder already checked to lie inside the model root ([`version_dir`]).
fn folder_precision(dir: &Path, default: Precision) -> Result<Precision, EngineError> {
    let path = dir.join(VERSION_SETTINGS);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(default),
        Err(e) => {
            return Err(EngineError::Load(format!("{}: {e}", path.display())));
        }
    };
    let settings: VersionSettings = serde_json::from_str(&text).map_err(|e| {
        EngineError::Load(format!(
            "{}: {e} (expected {{\"precision\": \"bf16\"}} or {{\"precision\": \"fp8\"}})",
            path.display()
        ))
    })?;
    Ok(settings.precision.unwrap_or(default))
}

/// SDXL has no fp8 transformer: a version asked to run in fp8 is refused, with the way out.
fn sdxl_precision(precision: Precision, what: &str) -> Result<(), EngineError> {
    match precision {
        Precision::Bf16 => Ok(()),
        other => Err(EngineError::Load(format!(
            "precision {other} is not available for SDXL (model version {what}); use bf16"
        ))),
    }
}

/// `tiny-random-<seed>` (bf16) or `tiny-random-<seed>-fp8`: the seed and precision of a tiny
/// random-weight version; `None` for any other version name.
fn tiny_random_version(version: &str) -> Option<Result<(u64, Precision), EngineError>> {
    let rest = version.strip_prefix("tiny-random-")?;
    let (seed, precision) = match rest.strip_suffix("-fp8") {
        Some(seed) => (seed, Precision::Fp8),
        None => (rest, Precision::Bf16),
    };
    Some(seed.parse::<u64>().map(|s| (s, precision)).map_err(|_| {
        EngineError::Load(format!(
            "version {version:?}: tiny-random-<seed>[-fp8] needs a numeric seed"
        ))
    }))
}

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
            precision,
        } => {
            let default = configured_precision(precision)?;
            let (family, precision) = match model_dir {
                Some(dir) => (Family::of_dir(dir)?, folder_precision(dir, default)?),
                None => {
                    warn_tiny_precision(default);
                    (Family::Flux, Precision::Bf16)
                }
            };
            Ok(vec![parallel(
                model_dir.as_deref(),
                family,
                *low_memory,
                plan,
                autotune,
                devices,
                *fault_gpu,
                precision,
            )?])
        }
        EngineChoice::Flux {
            model_dir: None,
            precision,
            ..
        } => {
            tracing::warn!(
                "no model directory (DITFLEET_MODEL_DIR / FLUX_MODEL_DIR): serving the TINY RANDOM-WEIGHT Flux and SDXL configs (not trained models; images are noise)"
            );
            warn_tiny_precision(configured_precision(precision)?);
            tiny_random(0)
        }
        EngineChoice::Flux {
            model_dir: Some(dir),
            low_memory,
            plan: None,
            precision,
            ..
        } => Ok(vec![load_model(
            dir,
            *low_memory,
            devices,
            configured_precision(precision)?,
        )?]),
    }
}

/// `DITFLEET_PRECISION` names the precision of model folders; the tiny configs a worker starts
/// with are named `tiny-random-0` and so stay bf16.
fn warn_tiny_precision(precision: Precision) {
    if precision != Precision::Bf16 {
        tracing::warn!(
            precision = %precision,
            "DITFLEET_PRECISION applies to model folders; without one the worker starts the tiny configs as tiny-random-0 (bf16): load flux-dev@tiny-random-<seed>-fp8 for the tiny Flux config in fp8"
        );
    }
}

/// The tiny random-weight pipelines: Flux (`flux-dev`) and SDXL (`sdxl-base`), from one seed.
fn tiny_random(seed: u64) -> Result<Vec<Box<dyn Engine>>, EngineError> {
    Ok(vec![
        Box::new(Pipeline::tiny_random(seed)?),
        Box::new(SdxlPipeline::tiny_random(seed)?),
    ])
}

/// The model in `dir`: Flux.1 or SDXL, as its `model_index.json` says, in the precision its
/// [`VERSION_SETTINGS`] names, else `default` (`DITFLEET_PRECISION`).
fn load_model(
    dir: &Path,
    low_memory: bool,
    devices: Option<&[String]>,
    default: Precision,
) -> Result<Box<dyn Engine>, EngineError> {
    let family = Family::of_dir(dir)?;
    let precision = folder_precision(dir, default)?;
    Ok(match family {
        Family::Flux => Box::new(load_flux(dir, low_memory, devices, precision)?),
        Family::Sdxl => {
            sdxl_precision(precision, &folder_name(dir))?;
            Box::new(load_sdxl(dir, low_memory, devices)?)
        }
    })
}

/// A model folder's name (its version).
fn folder_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string())
}

fn kind_for(dev: Device) -> Kind {
    if dev.is_cuda() {
        Kind::BFloat16
    } else {
        Kind::Float
    }
}

fn load_flux(
    dir: &Path,
    low_memory: bool,
    devices: Option<&[String]>,
    precision: Precision,
) -> Result<Pipeline, EngineError> {
    let dev = pick_device(devices)?;
    let mut options = PipelineOptions::new(dev, kind_for(dev));
    // A checkpoint already quantised to FP8 loads as fp8 whatever is asked; the engine's info
    // says what was loaded.
    options.precision = precision;
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
/// (Flux for `flux-dev`, SDXL for `sdxl-base`), `tiny-random-<seed>-fp8` the tiny Flux config in
/// fp8; any other version is the checkpoint directory `<model_root>/<version>` (Flux.1 or SDXL),
/// which must hold `model`, in the precision of its [`VERSION_SETTINGS`] file, else
/// `DITFLEET_PRECISION`. The version is checked to be one folder name inside the root before
/// anything in it is read.
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
            precision,
            ..
        } => {
            let family = Family::of(model)
                .ok_or_else(|| EngineError::Load(format!("no engine serves model {model:?}")))?;
            let (dir, precision) = match tiny_random_version(version) {
                Some(tiny) => (None, tiny?.1),
                None => {
                    let dir = model_root
                        .ok_or_else(|| {
                            EngineError::Load(format!(
                                "cannot load {model}@{version}: set DITFLEET_MODEL_ROOT (versions are <root>/<version>)"
                            ))
                        })
                        .and_then(|root| version_dir(root, version))?;
                    let precision = folder_precision(&dir, configured_precision(precision)?)?;
                    (Some(dir), precision)
                }
            };
            if family == Family::Sdxl {
                sdxl_precision(precision, version)?;
            }
            Ok(vec![parallel(
                dir.as_deref(),
                family,
                *low_memory,
                plan,
                autotune,
                devices,
                *fault_gpu,
                precision,
            )?])
        }
        EngineChoice::Flux {
            low_memory,
            precision,
            ..
        } => {
            let engine: Box<dyn Engine> = if let Some(tiny) = tiny_random_version(version) {
                let (seed, precision) = tiny?;
                match Family::of(model) {
                    Some(Family::Sdxl) => {
                        sdxl_precision(precision, version)?;
                        Box::new(SdxlPipeline::tiny_random(seed)?)
                    }
                    _ => Box::new(Pipeline::tiny_random_precision(seed, precision)?),
                }
            } else {
                let root = model_root.ok_or_else(|| {
                    EngineError::Load(format!(
                        "cannot load {model}@{version}: set DITFLEET_MODEL_ROOT (versions are <root>/<version>)"
                    ))
                })?;
                load_model(
                    &version_dir(root, version)?,
                    *low_memory,
                    devices,
                    configured_precision(precision)?,
                )?
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
#[allow(clippy::too_many_arguments)]
fn parallel(
    model_dir: Option<&std::path::Path>,
    family: Family,
    low_memory: bool,
    plan: &str,
    autotune: &Autotune,
    devices: Option<&[String]>,
    fault_gpu: Option<(usize, u32, bool)>,
    precision: Precision,
) -> Result<Box<dyn Engine>, EngineError> {
    let dir = model_dir.map(|d| d.to_path_buf());
    Ok(match family {
        Family::Flux => {
            let make_leader: LeaderFn<Pipeline> = Box::new(move |dev: Device| match &dir {
                Some(dir) => {
                    let mut o = PipelineOptions::new(dev, kind_for(dev));
                    o.free_text_encoders = low_memory;
                    o.precision = precision;
                    Pipeline::load(dir, o)
                }
                None => {
                    tracing::warn!(
                        "no model directory (DITFLEET_MODEL_DIR / FLUX_MODEL_DIR): the parallel plan serves the TINY RANDOM-WEIGHT Flux config"
                    );
                    Pipeline::tiny_random_precision(0, precision)
                }
            });
            Box::new(parallel_engine(
                model_dir,
                make_leader,
                plan,
                autotune,
                devices,
                fault_gpu,
                precision,
            )?)
        }
        Family::Sdxl => {
            sdxl_precision(
                precision,
                &model_dir.map_or_else(|| "tiny-random".into(), folder_name),
            )?;
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
                precision,
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
    precision: Precision,
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
    let mut model_id = match model_dir {
        Some(d) => d.display().to_string(),
        None => "tiny-random".to_string(),
    };
    // Plans measured in bf16 are not the fp8 build's (the bf16 id is the one caches already hold).
    if precision != Precision::Bf16 {
        model_id = format!("{model_id} {precision}");
    }
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
            precision: "bf16".into(),
        }
    }

    fn versions(engines: &[Box<dyn Engine>]) -> Vec<String> {
        engines.iter().flat_map(|e| e.info().model_versions).collect()
    }

    /// The committed SDXL golden folder (a tiny but complete diffusers SDXL pipeline).
    fn sdxl_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("engine/tests/goldens/sdxl_pipeline_small/pipeline")
    }

    /// A model root in a fresh temporary folder.
    fn temp_root(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("ditfleet-precision-{tag}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// `<root>/<version>/`: the committed checkpoint folder `golden`, linked entry by entry, with
    /// `settings` as its `ditfleet.json` when given (the golden folder itself stays untouched).
    fn version_folder(root: &Path, version: &str, golden: &Path, settings: Option<&str>) {
        let v = root.join(version);
        std::fs::create_dir_all(&v).unwrap();
        for e in std::fs::read_dir(golden).unwrap() {
            let e = e.unwrap();
            std::os::unix::fs::symlink(e.path(), v.join(e.file_name())).unwrap();
        }
        if let Some(text) = settings {
            std::fs::write(v.join(VERSION_SETTINGS), text).unwrap();
        }
    }

    /// The committed tiny Flux.1-dev folder (diffusers layout).
    fn flux_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("engine/tests/goldens/small/pipeline")
    }

    fn with_precision(mut c: EngineChoice, p: &str) -> EngineChoice {
        if let EngineChoice::Flux { precision, .. } = &mut c {
            *precision = p.into();
        }
        c
    }

    fn request(model: &str) -> ditfleet_engine::GenerateRequest {
        ditfleet_engine::GenerateRequest {
            model: model.into(),
            prompt: "a lighthouse".into(),
            negative_prompt: None,
            width: 64,
            height: 64,
            steps: 2,
            guidance: 3.5,
            true_cfg_scale: 1.0,
            plan: None,
            seed: 1,
            scheduler: None,
            loras: Vec::new(),
        }
    }

    #[test]
    fn tiny_random_fp8_is_the_tiny_flux_config_in_fp8_and_its_job_records_fp8() {
        let c = choice(None, None);
        let mut e = build_version(&c, "flux-dev", "tiny-random-7-fp8", 1, None, None).unwrap();
        let info = e[0].info();
        assert_eq!(info.precision, Precision::Fp8);
        assert_eq!(info.models, vec!["flux-dev".to_string()]);
        // A job runs on it end to end (FP8 emulated on the CPU) and its timings say fp8.
        let image = e[0]
            .generate(&request("flux-dev"), &mut |_| ditfleet_engine::Control::Continue)
            .unwrap();
        assert!(!image.to_png().unwrap().is_empty());
        let timings = crate::job::timings_with_precision(&image.timings, info.precision);
        assert_eq!(timings["precision"], "fp8", "{timings}");
        // The plain name stays bf16, whatever DITFLEET_PRECISION says.
        let e = build_version(
            &with_precision(c, "fp8"),
            "flux-dev",
            "tiny-random-7",
            1,
            None,
            None,
        )
        .unwrap();
        assert_eq!(e[0].info().precision, Precision::Bf16);
        let err = build_version(
            &choice(None, None),
            "flux-dev",
            "tiny-random-x-fp8",
            1,
            None,
            None,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("needs a numeric seed"), "{err}");
    }

    #[test]
    fn a_parallel_plan_loads_its_ranks_at_the_versions_precision() {
        let cpus = ["cpu".to_string(), "cpu".to_string()];
        let mut e = build_version(
            &choice(None, Some("ulysses=2")),
            "flux-dev",
            "tiny-random-0-fp8",
            1,
            Some(&cpus),
            None,
        )
        .unwrap();
        let info = e[0].info();
        assert_eq!((info.parallel_degree, info.precision), (2, Precision::Fp8));
        let image = e[0]
            .generate(&request("flux-dev"), &mut |_| ditfleet_engine::Control::Continue)
            .unwrap();
        assert_eq!(image.timings.plan.as_deref(), Some("ulysses=2"));
    }

    #[test]
    fn fp8_is_refused_for_sdxl_with_a_load_error_naming_the_version_and_bf16_settings_load_it() {
        let c = choice(None, None);
        for plan in [None, Some("cfg=2")] {
            let cpus = ["cpu".to_string(), "cpu".to_string()];
            let err = build_version(
                &choice(None, plan),
                "sdxl-base",
                "tiny-random-7-fp8",
                1,
                Some(&cpus),
                None,
            )
            .err()
            .unwrap()
            .to_string();
            assert!(
                err.contains(
                    "precision fp8 is not available for SDXL (model version tiny-random-7-fp8); use bf16"
                ),
                "{plan:?}: {err}"
            );
        }
        // DITFLEET_PRECISION=fp8 with an SDXL model directory: refused at start.
        let cpu = ["cpu".to_string()];
        let err = build(
            &with_precision(choice(Some(&sdxl_dir()), None), "fp8"),
            1,
            Some(&cpu),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            err.contains("precision fp8 is not available for SDXL (model version pipeline)"),
            "{err}"
        );
        // An SDXL version whose ditfleet.json says bf16 loads under an fp8 default; one that
        // says fp8 is refused.
        let root = temp_root("sdxl");
        version_folder(&root, "s1", &sdxl_dir(), Some(r#"{"precision": "bf16"}"#));
        version_folder(&root, "s1-fp8", &sdxl_dir(), Some(r#"{"precision": "fp8"}"#));
        let fp8_default = with_precision(c, "fp8");
        let e = build_version(&fp8_default, "sdxl-base", "s1", 1, Some(&cpu), Some(&root)).unwrap();
        assert_eq!(versions(&e), vec!["sdxl-base@s1"]);
        assert_eq!(e[0].info().precision, Precision::Bf16);
        let err = build_version(
            &choice(None, None),
            "sdxl-base",
            "s1-fp8",
            1,
            Some(&cpu),
            Some(&root),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            err.contains("precision fp8 is not available for SDXL (model version s1-fp8)"),
            "{err}"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_version_folders_ditfleet_json_selects_its_precision_and_a_malformed_one_is_a_load_error_naming_it() {
        let root = temp_root("settings");
        version_folder(&root, "v2", &flux_dir(), None);
        version_folder(&root, "v2-fp8", &flux_dir(), Some(r#"{"precision": "fp8"}"#));
        let cpu = ["cpu".to_string()];
        let c = choice(None, None);
        let e = build_version(&c, "flux-dev", "v2-fp8", 1, Some(&cpu), Some(&root)).unwrap();
        assert_eq!(versions(&e), vec!["flux-dev@v2-fp8"]);
        assert_eq!(e[0].info().precision, Precision::Fp8);
        // Without the file the version takes DITFLEET_PRECISION.
        let e = build_version(&c, "flux-dev", "v2", 1, Some(&cpu), Some(&root)).unwrap();
        assert_eq!(e[0].info().precision, Precision::Bf16);
        for (version, text, says) in [
            ("bad-value", r#"{"precision": "fp16"}"#, "fp16"),
            ("typo", r#"{"precison": "fp8"}"#, "unknown field `precison`"),
            ("not-json", "precision=fp8", "expected"),
            ("not-object", r#""fp8""#, "expected"),
        ] {
            version_folder(&root, version, &flux_dir(), Some(text));
            let err = build_version(&c, "flux-dev", version, 1, Some(&cpu), Some(&root))
                .err()
                .unwrap();
            assert!(matches!(err, EngineError::Load(_)), "{err:?}");
            let err = err.to_string();
            let file = root.join(version).join(VERSION_SETTINGS);
            assert!(
                err.contains(&file.display().to_string()) && err.contains(says),
                "{version}: {err}"
            );
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_version_that_is_not_one_folder_name_inside_the_root_is_refused_before_any_settings_are_read() {
        // Malformed settings files wherever a hostile name could reach: reading any of them would
        // give an error naming it.
        let outside = temp_root("escape");
        let root = outside.join("root");
        for d in [&outside, &root, &outside.join("x"), &root.join("a")] {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join(VERSION_SETTINGS), "{ not json").unwrap();
        }
        let cpus = ["cpu".to_string(), "cpu".to_string()];
        for plan in [None, Some("cfg=2")] {
            let c = choice(None, plan);
            for version in ["..", ".", "../x", "a/..", "a/b", "/abs", ".hidden", "", "a\\b"] {
                let err = build_version(&c, "flux-dev", version, 1, Some(&cpus), Some(&root))
                    .err()
                    .unwrap()
                    .to_string();
                assert!(
                    err.contains("cannot be used as a path or key segment")
                        && !err.contains(VERSION_SETTINGS),
                    "{version:?} ({plan:?}): {err}"
                );
            }
        }
        std::fs::remove_dir_all(&outside).unwrap();
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
