//! NVML through the real driver library. On a machine without a GPU driver the worker must export
//! no `ditfleet_gpu_*` series; on a GPU machine (run with `--ignored`, e.g. through
//! `scripts/gpu-nvml-test.sh`) every GPU must report healthy with plausible readings.

use ditfleet_gpu::{GpuMetrics, Gpus};
use prometheus_client::registry::Registry;

fn encode(r: &Registry) -> String {
    let mut s = String::new();
    prometheus_client::encoding::text::encode(&mut s, r).unwrap();
    s
}

fn value(text: &str, prefix: &str) -> Vec<f64> {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect()
}

#[test]
fn without_a_gpu_driver_no_gpu_series_are_registered_and_no_gpus_listed() {
    let gpus = Gpus::init();
    if gpus.is_present() {
        // A GPU machine: the ignored test below covers it.
        return;
    }
    let mut r = Registry::default();
    assert!(GpuMetrics::register_if_present(&gpus, &mut r).is_none());
    assert!(!encode(&r).contains("ditfleet_gpu_"));
    assert!(gpus.list().is_empty());
}

#[test]
#[ignore = "needs an NVIDIA GPU and driver"]
fn on_a_gpu_machine_every_gpu_reports_healthy_memory_utilization_and_temperature() {
    let gpus = Gpus::init();
    assert!(gpus.is_present(), "NVML did not load: no NVIDIA driver here");
    let list = gpus.list();
    assert!(!list.is_empty(), "NVML lists no GPU");
    let mut r = Registry::default();
    let m = GpuMetrics::register_if_present(&gpus, &mut r).expect("registered where NVML works");
    gpus.update_metrics(&m);
    let text = encode(&r);
    println!("{text}");
    let n = list.len();
    assert_eq!(value(&text, "ditfleet_gpu_healthy{"), vec![1.0; n], "{text}");
    let total = value(&text, "ditfleet_gpu_memory_total_bytes{");
    assert_eq!(total.len(), n);
    for (t, g) in total.iter().zip(&list) {
        assert_eq!(*t as u64, g.memory_total_bytes);
        assert!(*t > 1e9, "a datacentre GPU has GiBs of memory: {t}");
    }
    let used = value(&text, "ditfleet_gpu_memory_used_bytes{");
    assert!(used.iter().zip(&total).all(|(u, t)| *u <= *t), "{text}");
    let util = value(&text, "ditfleet_gpu_utilization_ratio{");
    assert!(
        util.len() == n && util.iter().all(|u| (0.0..=1.0).contains(u)),
        "{text}"
    );
    let temp = value(&text, "ditfleet_gpu_temperature_celsius{");
    assert!(
        temp.len() == n && temp.iter().all(|t| (5.0..=110.0).contains(t)),
        "{text}"
    );
    assert!(text.contains(&format!("name=\"{}\"", list[0].name)), "{text}");
}
