//! Tests of the configuration loaders.

use super::*;

fn env(pairs: &[(&str, &str)]) -> Env<'static> {
    Env::from_map(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

#[test]
fn plan_is_read_and_malformed_plans_are_refused() {
    let c = WorkerConfig::from_env(&env(&[("DITFLEET_PLAN", "ring=2,ulysses=2")])).unwrap();
    assert!(matches!(c.engine, EngineChoice::Flux { plan: Some(ref p), .. } if p == "ring=2,ulysses=2"));
    let c = WorkerConfig::from_env(&env(&[("DITFLEET_PLAN", "single")])).unwrap();
    assert!(matches!(c.engine, EngineChoice::Flux { plan: None, .. }));
    let e = WorkerConfig::from_env(&env(&[("DITFLEET_PLAN", "ulysses=2; rm -rf")])).unwrap_err();
    assert_eq!(e.var, "DITFLEET_PLAN");
    let c = WorkerConfig::from_env(&env(&[("DITFLEET_FAULT_GPU", "2:3")])).unwrap();
    assert!(matches!(
        c.engine,
        EngineChoice::Flux {
            fault_gpu: Some((2, 3, false)),
            ..
        }
    ));
    let c = WorkerConfig::from_env(&env(&[("DITFLEET_FAULT_GPU", "1:4:hang")])).unwrap();
    assert!(matches!(
        c.engine,
        EngineChoice::Flux {
            fault_gpu: Some((1, 4, true)),
            ..
        }
    ));
    for bad in ["2", "x:3", "2:0", "2:3:melt", "2:3:hang:x"] {
        let e = WorkerConfig::from_env(&env(&[("DITFLEET_FAULT_GPU", bad)])).unwrap_err();
        assert_eq!(e.var, "DITFLEET_FAULT_GPU");
    }
}

#[test]
fn autotune_cache_and_sizes_are_read_and_bad_sizes_refused() {
    let tune = |pairs: &[(&str, &str)]| match WorkerConfig::from_env(&env(pairs)).unwrap().engine {
        EngineChoice::Flux { autotune, .. } => autotune,
        other => panic!("{other:?}"),
    };
    let t = tune(&[("DITFLEET_PLAN", "auto"), ("HOME", "/home/w")]);
    assert_eq!(t.cache, PathBuf::from("/home/w/.cache/ditfleet/plans.json"));
    let t = tune(&[("XDG_CACHE_HOME", "/xdg"), ("HOME", "/home/w")]);
    assert_eq!(t.cache, PathBuf::from("/xdg/ditfleet/plans.json"));
    let t = tune(&[
        ("DITFLEET_PLAN_CACHE", "/var/cache/plans.json"),
        ("DITFLEET_AUTOTUNE_SIZES", "512x512, 1024x2048"),
    ]);
    assert_eq!(t.cache, PathBuf::from("/var/cache/plans.json"));
    assert_eq!(t.sizes, vec![(512, 512), (1024, 2048)]);
    for bad in ["1024", "1000x1024", "0x16", "8192x8192", ","] {
        let e = WorkerConfig::from_env(&env(&[("DITFLEET_AUTOTUNE_SIZES", bad)])).unwrap_err();
        assert_eq!(e.var, "DITFLEET_AUTOTUNE_SIZES", "{bad:?}");
    }
}

#[test]
fn the_model_dir_is_ditfleet_model_dir_else_flux_model_dir_and_its_parent_the_root() {
    let dir = |pairs: &[(&str, &str)]| {
        let c = WorkerConfig::from_env(&env(pairs)).unwrap();
        match c.engine {
            EngineChoice::Flux { model_dir, .. } => (model_dir, c.model_root),
            other => panic!("{other:?}"),
        }
    };
    let p = |s: &str| Some(PathBuf::from(s));
    assert_eq!(
        dir(&[("FLUX_MODEL_DIR", "/m/FLUX.1-dev")]),
        (p("/m/FLUX.1-dev"), p("/m"))
    );
    assert_eq!(
        dir(&[
            ("DITFLEET_MODEL_DIR", "/models/sdxl-base-1.0"),
            ("FLUX_MODEL_DIR", "/m/FLUX.1-dev")
        ]),
        (p("/models/sdxl-base-1.0"), p("/models"))
    );
    assert_eq!(
        dir(&[
            ("DITFLEET_MODEL_DIR", "/models/sdxl"),
            ("DITFLEET_MODEL_ROOT", "/versions")
        ]),
        (p("/models/sdxl"), p("/versions"))
    );
    assert_eq!(dir(&[]), (None, None));
}

#[test]
fn low_memory_is_parsed() {
    let c = WorkerConfig::from_env(&env(&[("DITFLEET_LOW_MEMORY", "1")])).unwrap();
    assert!(matches!(c.engine, EngineChoice::Flux { low_memory: true, .. }));
    assert!(WorkerConfig::from_env(&env(&[("DITFLEET_LOW_MEMORY", "yes")])).is_err());
}

#[test]
fn precision_is_bf16_by_default_fp8_when_asked_and_anything_else_names_the_variable() {
    let precision = |pairs: &[(&str, &str)]| match WorkerConfig::from_env(&env(pairs)).unwrap().engine {
        EngineChoice::Flux { precision, .. } => precision,
        other => panic!("{other:?}"),
    };
    assert_eq!(precision(&[]), "bf16");
    assert_eq!(precision(&[("DITFLEET_PRECISION", "bf16")]), "bf16");
    assert_eq!(precision(&[("DITFLEET_PRECISION", "fp8")]), "fp8");
    assert_eq!(
        precision(&[("DITFLEET_PRECISION", "")]),
        "bf16",
        "empty counts as unset"
    );
    for bad in ["fp16", "FP8", "int8", "e4m3"] {
        let e = WorkerConfig::from_env(&env(&[("DITFLEET_PRECISION", bad)])).unwrap_err();
        assert_eq!(e.var, "DITFLEET_PRECISION", "{bad:?}");
        let text = e.to_string();
        assert!(
            text.contains("DITFLEET_PRECISION") && text.contains("bf16, fp8"),
            "{text}"
        );
    }
}

#[test]
fn defaults_load_without_any_variable() {
    let c = WorkerConfig::from_env(&env(&[])).unwrap();
    assert_eq!(c.slots, 1);
    assert_eq!(c.common.namespace, "ditfleet");
    assert_eq!(
        c.engine,
        EngineChoice::Flux {
            model_dir: None,
            low_memory: false,
            plan: None,
            autotune: Autotune {
                cache: std::env::temp_dir().join("ditfleet").join("plans.json"),
                sizes: vec![(1024, 1024), (2048, 2048)],
            },
            fault_gpu: None,
            precision: "bf16".into(),
        }
    );
    let s = SchedulerConfig::from_env(&env(&[])).unwrap();
    assert_eq!(s.prefetch, 64);
    assert_eq!(s.classes.names(), vec!["small", "medium", "large", "xlarge"]);
}

#[test]
fn bad_values_name_the_variable() {
    let e = WorkerConfig::from_env(&env(&[("DITFLEET_WORKER_SLOTS", "many")])).unwrap_err();
    assert_eq!(e.var, "DITFLEET_WORKER_SLOTS");
    assert!(e.to_string().contains("DITFLEET_WORKER_SLOTS"), "{e}");
    let e = WorkerConfig::from_env(&env(&[("DITFLEET_ENGINE", "gpu")])).unwrap_err();
    assert_eq!(e.var, "DITFLEET_ENGINE");
    let e = WorkerConfig::from_env(&env(&[("DITFLEET_AMQP_URL", "http://x")])).unwrap_err();
    assert_eq!(e.var, "DITFLEET_AMQP_URL");
    let e = WorkerConfig::from_env(&env(&[("DITFLEET_RESULT_URL", "http://bucket/p")])).unwrap_err();
    assert_eq!(e.var, "DITFLEET_RESULT_URL");
    let c = WorkerConfig::from_env(&env(&[("DITFLEET_RESULT_URL", "s3://bucket/p")])).unwrap();
    assert_eq!(c.result_url.as_deref(), Some("s3://bucket/p"));
    let e = WorkerConfig::from_env(&env(&[("DITFLEET_DEVICES", "cuda:x")])).unwrap_err();
    assert_eq!(e.var, "DITFLEET_DEVICES");
    let e = SchedulerConfig::from_env(&env(&[("DITFLEET_CLASSES", "a=5,b=3,c")])).unwrap_err();
    assert_eq!(e.var, "DITFLEET_CLASSES");
    let e = CommonConfig::from_env(&env(&[("DITFLEET_NAMESPACE", "a b")])).unwrap_err();
    assert_eq!(e.var, "DITFLEET_NAMESPACE");
    let e = CommonConfig::from_env(&env(&[("DITFLEET_HTTP_ADDR", "localhost")])).unwrap_err();
    assert_eq!(e.var, "DITFLEET_HTTP_ADDR");
    let e = CommonConfig::from_env(&env(&[("DITFLEET_BROKER_RECOVERY_TIMEOUT_MS", "0")])).unwrap_err();
    assert_eq!(e.var, "DITFLEET_BROKER_RECOVERY_TIMEOUT_MS");
    let c = CommonConfig::from_env(&env(&[("DITFLEET_BROKER_RECOVERY_TIMEOUT_MS", "1500")])).unwrap();
    assert_eq!(c.broker_recovery_timeout, Duration::from_millis(1500));
}

#[test]
fn tenant_limits_and_faults_parse_and_bad_ones_name_the_variable() {
    let s = SchedulerConfig::from_env(&env(&[
        ("DITFLEET_TENANT_RATE", "2"),
        ("DITFLEET_TENANT_LIMITS", "acme=5:50, trial=0.1:3,free=0:1"),
    ]))
    .unwrap();
    let l = &s.tenant_limits;
    assert_eq!(
        l.for_tenant("other"),
        Some(TenantLimit {
            rate: 2.0,
            burst: 20.0
        })
    );
    assert_eq!(
        l.for_tenant("trial"),
        Some(TenantLimit {
            rate: 0.1,
            burst: 3.0
        })
    );
    assert_eq!(l.for_tenant("free"), None, "rate 0 = unlimited");
    assert_eq!(
        SchedulerConfig::from_env(&env(&[]))
            .unwrap()
            .tenant_limits
            .for_tenant("x"),
        None,
        "unlimited by default"
    );
    for (var, value) in [
        ("DITFLEET_TENANT_LIMITS", "acme=fast:1"),
        ("DITFLEET_TENANT_LIMITS", "acme"),
        ("DITFLEET_TENANT_LIMITS", "acme=1:0"),
        ("DITFLEET_TENANT_RATE", "-1"),
        ("DITFLEET_SPILL", "maybe"),
    ] {
        assert_eq!(
            SchedulerConfig::from_env(&env(&[(var, value)])).unwrap_err().var,
            var
        );
    }
    let w = WorkerConfig::from_env(&env(&[
        ("DITFLEET_ENGINE", "simulated"),
        ("DITFLEET_SIM_FAULTS", "oom=2,bad-weights"),
        ("DITFLEET_WORKER_SLOTS", "3"),
    ]))
    .unwrap();
    assert_eq!(w.prefetch, 4, "slots + 1 by default");
    assert!(matches!(
        w.engine,
        EngineChoice::Simulated {
            faults: SimFaults {
                oom: 2,
                device: 0,
                bad_weights: true,
                panic: 0
            },
            ..
        }
    ));
    for (var, value) in [
        ("DITFLEET_SIM_FAULTS", "meteor"),
        ("DITFLEET_SWAP_MODE", "yolo"),
        ("DITFLEET_SIM_VERSION", "v 2"),
    ] {
        let e = WorkerConfig::from_env(&env(&[("DITFLEET_ENGINE", "simulated"), (var, value)])).unwrap_err();
        assert_eq!(e.var, var);
    }
}

#[test]
fn url_errors_do_not_leak_passwords() {
    let e = CommonConfig::from_env(&env(&[("DITFLEET_REDIS_URL", "http://user:s3cret@host")])).unwrap_err();
    assert!(!e.to_string().contains("s3cret"), "{e}");
}
