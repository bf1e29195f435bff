//! GPU inventory, health and metrics through NVML (absent on CPU-only machines, which then report
//! no GPUs and export no `ditfleet_gpu_*` series).

use ditfleet_common::state::GpuInfo;
use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuLabels {
    pub gpu: String,
    pub name: String,
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// `ditfleet_gpu_*` families, registered only when NVML works (a CPU-only worker exports none).
#[derive(Clone, Debug, Default)]
pub struct GpuMetrics {
    /// 1 while NVML answers every query for the GPU, 0 once it does not (lost, fallen off the
    /// bus, XID errors).
    pub healthy: Family<GpuLabels, Gauge>,
    /// GPU busy fraction over NVML's last sample period, 0..1.
    pub utilization: Family<GpuLabels, FloatGauge>,
    pub memory_used_bytes: Family<GpuLabels, Gauge>,
    pub memory_total_bytes: Family<GpuLabels, Gauge>,
    pub temperature_celsius: Family<GpuLabels, Gauge>,
}

impl GpuMetrics {
    /// Registers the families only where NVML works (`gpus.is_present()`).
    pub fn register_if_present(gpus: &Gpus, registry: &mut Registry) -> Option<Self> {
        gpus.is_present().then(|| Self::register(registry))
    }

    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("ditfleet_gpu");
        r.register(
            "healthy",
            "1 while NVML answers every query for the GPU",
            m.healthy.clone(),
        );
        r.register(
            "utilization_ratio",
            "GPU busy fraction (NVML)",
            m.utilization.clone(),
        );
        r.register(
            "memory_used_bytes",
            "GPU memory in use (NVML)",
            m.memory_used_bytes.clone(),
        );
        r.register(
            "memory_total_bytes",
            "GPU memory in total (NVML)",
            m.memory_total_bytes.clone(),
        );
        r.register(
            "temperature_celsius",
            "GPU core temperature (NVML)",
            m.temperature_celsius.clone(),
        );
        m
    }
}

/// NVML handle if the driver library is present.
pub struct Gpus {
    nvml: Option<Nvml>,
}

impl std::fmt::Debug for Gpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpus")
            .field("nvml", &self.nvml.is_some())
            .finish()
    }
}

impl Gpus {
    pub fn init() -> Self {
        match Nvml::init() {
            Ok(nvml) => Self { nvml: Some(nvml) },
            Err(e) => {
                tracing::info!(reason = %e, "NVML not available; reporting no GPUs");
                Self { nvml: None }
            }
        }
    }

    /// Whether NVML is loaded (a GPU driver is present).
    pub fn is_present(&self) -> bool {
        self.nvml.is_some()
    }

    /// Samples every GPU into `m`.
    pub fn update_metrics(&self, m: &GpuMetrics) {
        let Some(nvml) = &self.nvml else { return };
        let n = nvml.device_count().unwrap_or(0);
        for i in 0..n {
            let Ok(d) = nvml.device_by_index(i) else {
                m.healthy
                    .get_or_create(&GpuLabels {
                        gpu: i.to_string(),
                        name: "unknown".into(),
                    })
                    .set(0);
                continue;
            };
            let l = GpuLabels {
                gpu: i.to_string(),
                name: d.name().unwrap_or_else(|_| "unknown".into()),
            };
            let mut ok = true;
            match d.utilization_rates() {
                Ok(u) => {
                    m.utilization.get_or_create(&l).set(f64::from(u.gpu) / 100.0);
                }
                Err(_) => ok = false,
            }
            match d.memory_info() {
                Ok(mem) => {
                    m.memory_used_bytes.get_or_create(&l).set(mem.used as i64);
                    m.memory_total_bytes.get_or_create(&l).set(mem.total as i64);
                }
                Err(_) => ok = false,
            }
            match d.temperature(TemperatureSensor::Gpu) {
                Ok(t) => {
                    m.temperature_celsius.get_or_create(&l).set(i64::from(t));
                }
                Err(_) => ok = false,
            }
            m.healthy.get_or_create(&l).set(i64::from(ok));
        }
    }

    /// Current inventory (name and memory of every visible GPU).
    pub fn list(&self) -> Vec<GpuInfo> {
        let Some(nvml) = &self.nvml else { return Vec::new() };
        let n = nvml.device_count().unwrap_or(0);
        (0..n)
            .filter_map(|i| {
                let d = nvml.device_by_index(i).ok()?;
                let mem = d.memory_info().ok();
                Some(GpuInfo {
                    index: i,
                    name: d.name().unwrap_or_else(|_| "unknown".into()),
                    memory_total_bytes: mem.as_ref().map(|m| m.total).unwrap_or(0),
                    memory_used_bytes: mem.as_ref().map(|m| m.used).unwrap_or(0),
                })
            })
            .collect()
    }
}
