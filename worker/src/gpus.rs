//! GPU inventory through NVML (absent on CPU-only machines, which then report no GPUs).

use ditfleet_common::state::GpuInfo;
use nvml_wrapper::Nvml;

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
