//! Device helpers every part of the engine uses.

use tch::{Device, Tensor};

use crate::EngineError;

/// Waits for the work producing `t` (a one-element device-to-host copy; unlike
/// `tch::Cuda::synchronize` it reports a device error as an error instead of panicking).
pub fn sync_on(t: &Tensor) -> Result<(), EngineError> {
    if t.device().is_cuda() && t.numel() > 0 {
        let _host = t.f_flatten(0, -1)?.f_narrow(0, 0, 1)?.f_to_device(Device::Cpu)?;
    }
    Ok(())
}

/// `cpu`, `cuda:N`: how devices are named in engine info, errors and logs.
pub fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}
