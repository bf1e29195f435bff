//! Device health outside the CUDA/NCCL error path, for GPU isolation ([`super::resilient`]).
//!
//! A GPU can fail without any rank returning an error: it stops answering (fallen off the bus,
//! a hung kernel) and its peers wait in collectives until the step watchdog aborts them; or it
//! reports a hardware fault to the driver (a critical Xid, uncorrectable ECC errors) while the
//! jobs still complete. The probe asks NVML, where the driver library loads, about each CUDA
//! device:
//! - NVML can no longer query the device (`GpuLost` and friends);
//! - critical Xid events since the probe started (NVML event set, read without waiting);
//! - uncorrected volatile ECC errors above the count seen at start.
//!
//! CUDA ordinals are matched to NVML devices by PCI address (CUDA_VISIBLE_DEVICES renumbers
//! CUDA ordinals, NVML does not). Without NVML (CPU machines) the probe reports nothing, except
//! an injected hang ([`DeviceHealth::inject_hang`]), which stands for what NVML would see of a
//! device that stopped answering, so the whole path runs in CI.

use std::collections::HashMap;

use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError};
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::event::EventSet;
use tch::Device;

/// See the module docs. One per engine.
pub struct DeviceHealth {
    nvml: Option<&'static Nvml>,
    /// Critical Xid events of every device, registered at start.
    xids: Option<EventSet<'static>>,
    /// CUDA ordinal -> (NVML index, uncorrected volatile ECC count at start).
    devices: HashMap<usize, (u32, Option<u64>)>,
    /// NVML index -> critical Xids seen so far.
    seen_xids: HashMap<u32, Vec<u64>>,
    /// Slots reported hung by fault injection.
    injected: Vec<usize>,
}

impl std::fmt::Debug for DeviceHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceHealth")
            .field("nvml", &self.nvml.is_some())
            .field("devices", &self.devices)
            .field("injected", &self.injected)
            .finish()
    }
}

/// The process's NVML handle (leaked: NVML stays loaded for the life of the process, and event
/// sets borrow it).
fn nvml() -> Option<&'static Nvml> {
    static NVML: std::sync::OnceLock<Option<&'static Nvml>> = std::sync::OnceLock::new();
    *NVML.get_or_init(|| match Nvml::init() {
        Ok(n) => Some(&*Box::leak(Box::new(n))),
        Err(e) => {
            tracing::debug!(error = %e, "NVML not available: device health from CUDA/NCCL errors only");
            None
        }
    })
}

/// `domain:bus:device` of CUDA device `ordinal` (the driver API; `None` without a driver).
fn cuda_pci(ordinal: usize) -> Option<(i32, i32, i32)> {
    use cudarc::driver::sys::CUdevice_attribute as A;
    std::panic::catch_unwind(|| {
        let ctx = cudarc::driver::CudaContext::new(ordinal).ok()?;
        Some((
            ctx.attribute(A::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID).ok()?,
            ctx.attribute(A::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID).ok()?,
            ctx.attribute(A::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID).ok()?,
        ))
    })
    .ok()
    .flatten()
}

impl DeviceHealth {
    /// Probes the CUDA devices among `devices` (others are always healthy).
    pub fn new(devices: &[Device]) -> Self {
        let nvml = nvml();
        let mut me = Self {
            nvml,
            xids: None,
            devices: HashMap::new(),
            seen_xids: HashMap::new(),
            injected: Vec::new(),
        };
        let Some(n) = nvml else { return me };
        let count = n.device_count().unwrap_or(0);
        let mut set = n.create_event_set().ok();
        for d in devices {
            let Device::Cuda(ordinal) = *d else { continue };
            let index = cuda_pci(ordinal)
                .and_then(|(dom, bus, dev)| {
                    (0..count).find(|&i| {
                        n.device_by_index(i).and_then(|x| x.pci_info()).is_ok_and(|p| {
                            (p.domain as i32, p.bus as i32, p.device as i32) == (dom, bus, dev)
                        })
                    })
                })
                .unwrap_or(ordinal as u32);
            let Ok(dev) = n.device_by_index(index) else {
                continue;
            };
            let ecc = dev
                .total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
                .ok();
            if let Some(s) = set.take() {
                set = dev.register_events(EventTypes::CRITICAL_XID_ERROR, s).ok();
            }
            me.devices.insert(ordinal, (index, ecc));
        }
        me.xids = set;
        tracing::info!(devices = ?me.devices, xid_events = me.xids.is_some(), "device health probe ready (NVML)");
        me
    }

    /// Makes [`DeviceHealth::unhealthy`] report the device in `slot` as not answering (fault
    /// injection: the hung-device drill; NVML reports a device that fell off the bus the same way).
    pub fn inject_hang(&mut self, slot: usize) {
        if !self.injected.contains(&slot) {
            self.injected.push(slot);
        }
    }

    fn drain_xids(&mut self) {
        let Some(set) = &self.xids else { return };
        while let Ok(ev) = set.wait(0) {
            let Ok(index) = ev.device.index() else { continue };
            let xid = match ev.event_data {
                Some(XidError::Value(v)) => v,
                _ => 0,
            };
            self.seen_xids.entry(index).or_default().push(xid);
        }
    }

    /// Why the device in `slot` (`device`) is unhealthy, if it is.
    pub fn unhealthy(&mut self, slot: usize, device: Device) -> Option<String> {
        if self.injected.contains(&slot) {
            return Some("injected hang: the device stopped answering".into());
        }
        let Device::Cuda(ordinal) = device else {
            return None;
        };
        let n = self.nvml?;
        let &(index, ecc0) = self.devices.get(&ordinal)?;
        self.drain_xids();
        if let Some(x) = self.seen_xids.get(&index).filter(|x| !x.is_empty()) {
            return Some(format!("NVML: critical Xid {x:?} on GPU {index}"));
        }
        let dev = match n.device_by_index(index) {
            Ok(d) => d,
            Err(e) => return Some(format!("NVML cannot reach GPU {index}: {e}")),
        };
        if let Err(e) = dev.temperature(nvml_wrapper::enum_wrappers::device::TemperatureSensor::Gpu) {
            return Some(format!("NVML cannot query GPU {index}: {e}"));
        }
        if let (Some(before), Ok(now)) = (
            ecc0,
            dev.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile),
        ) && now > before
        {
            return Some(format!(
                "NVML: {} new uncorrected ECC errors on GPU {index}",
                now - before
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_devices_are_healthy_and_an_injected_hang_is_reported() {
        let devs = [Device::Cpu, Device::Cpu];
        let mut h = DeviceHealth::new(&devs);
        assert_eq!(h.unhealthy(0, Device::Cpu), None);
        h.inject_hang(1);
        assert_eq!(h.unhealthy(0, Device::Cpu), None);
        let why = h.unhealthy(1, Device::Cpu).expect("injected");
        assert!(why.contains("stopped answering"), "{why}");
    }
}
