//! Properties of the job decoder and validator over random and mutated bodies (the stable-Rust
//! companion of the `cargo fuzz` target in fuzz/): nothing panics, every rejection carries a
//! reason, and whatever is accepted obeys every rule of the contract and round-trips.

use ditfleet_common::job::{
    JobError, JobSpec, Limits, MAX_LORAS, MAX_SIDE, MAX_STEPS, MIN_SIDE, ModelFamily, WorkOrder,
    valid_lora_ident,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

fn valid() -> Value {
    json!({"schema_version": 1, "job_id": "j-1", "tenant": "acme", "model": "flux-dev",
           "model_version": "v2", "prompt": "a harbour at dawn", "negative_prompt": "blur",
           "width": 1024, "height": 768, "steps": 28, "guidance": 3.5, "seed": 42,
           "priority": "high", "deadline": "2030-01-01T00:00:00Z", "reply_to": "reply.svc",
           "labels": {"team/app": "x"}, "scheduler": "flow_euler",
           "loras": [{"name": "pixel-art", "version": "v1", "scale": 0.8}, {"name": "b", "version": "2"}]})
}

fn random_value(rng: &mut ChaCha8Rng, depth: u32) -> Value {
    match rng.random_range(0..if depth > 2 { 6 } else { 8 }) {
        0 => Value::Null,
        1 => json!(rng.random::<bool>()),
        2 => json!(rng.random_range(-5i64..5000)),
        3 => json!(rng.random::<f64>() * 1e6 - 1e3),
        4 => {
            let long = "x".repeat(rng.random_range(0..12_000));
            let pick = [
                "",
                " ",
                "flux-dev",
                "sdxl-base",
                "euler",
                "flow_euler",
                "..",
                "low",
                long.as_str(),
                "2030-01-01T00:00:00Z",
                "a b",
                "é",
            ];
            json!(pick[rng.random_range(0..pick.len())])
        }
        5 => json!(u64::MAX),
        6 => Value::Array(
            (0..rng.random_range(0..4))
                .map(|_| random_value(rng, depth + 1))
                .collect(),
        ),
        _ => Value::Object(
            (0..rng.random_range(0..40))
                .map(|i| (format!("k{i}"), random_value(rng, depth + 1)))
                .collect(),
        ),
    }
}

/// Checks one body; returns whether it was accepted.
fn check(body: &[u8]) -> bool {
    let _ = JobSpec::sniff_job_id(body);
    let _ = WorkOrder::decode(body);
    let spec = match JobSpec::parse(body) {
        Ok(s) => s,
        Err(JobError::Malformed(r)) => {
            assert!(!r.is_empty());
            return false;
        }
        Err(e) => panic!("parse reported {e:?}"),
    };
    let limits = Limits::default();
    match spec.validate(&limits) {
        Err(e) => {
            let r = e.to_string();
            assert!(r.starts_with("invalid job: ") && r.len() > 13, "{r}");
            false
        }
        Ok(()) => {
            // Every rule holds for an accepted job.
            assert_eq!(spec.schema_version, 1);
            for side in [spec.width, spec.height] {
                assert!((MIN_SIDE..=MAX_SIDE).contains(&side) && side % 16 == 0, "{side}");
            }
            assert!(spec.steps.is_none_or(|s| (1..=MAX_STEPS).contains(&s)));
            assert!(spec.guidance.is_none_or(|g| (0.0..=30.0).contains(&g)));
            assert!(!spec.prompt.trim().is_empty() && spec.prompt.chars().count() <= limits.max_prompt_chars);
            assert!(spec.labels.len() <= 32);
            let family = ModelFamily::of(&spec.model).expect("a known model");
            assert!(
                spec.scheduler
                    .as_deref()
                    .is_none_or(|s| family.schedulers().contains(&s))
            );
            assert!(family.has_true_cfg() || spec.true_cfg_scale.is_none_or(|t| t <= 1.0));
            assert!(spec.loras.len() <= MAX_LORAS);
            for (i, l) in spec.loras.iter().enumerate() {
                assert!(valid_lora_ident(&l.name) && valid_lora_ident(&l.version), "{l:?}");
                assert!(l.scale.is_none_or(|s| (-4.0..=4.0).contains(&s)), "{l:?}");
                assert!(
                    !spec.loras[..i]
                        .iter()
                        .any(|p| (&p.name, &p.version) == (&l.name, &l.version))
                );
            }
            let again = JobSpec::parse(&serde_json::to_vec(&spec).unwrap()).unwrap();
            assert_eq!(again, spec);
            let o = WorkOrder::from_spec(&spec, "small", 1, 2);
            assert_eq!(WorkOrder::decode(&o.encode()).unwrap(), o);
            true
        }
    }
}

#[test]
fn mutated_and_random_bodies_never_panic_and_are_accepted_only_when_every_rule_holds() {
    let mut rng = ChaCha8Rng::seed_from_u64(0xd17f);
    let base = serde_json::to_vec(&valid()).unwrap();
    assert!(check(&base), "the base body is valid");
    let keys: Vec<String> = valid().as_object().unwrap().keys().cloned().collect();
    let (mut accepted, mut rejected) = (0, 0);
    for i in 0..20_000 {
        let body: Vec<u8> = match i % 4 {
            // Byte-level mutations of a valid body.
            0 => {
                let mut b = base.clone();
                for _ in 0..rng.random_range(1..6) {
                    let n = b.len();
                    match rng.random_range(0..4) {
                        0 if n > 0 => b[rng.random_range(0..n)] = rng.random(),
                        1 if n > 0 => {
                            b.remove(rng.random_range(0..n));
                        }
                        2 => b.insert(
                            rng.random_range(0..=n),
                            b"{}[],:\"0-e.\\"[rng.random_range(0..12)],
                        ),
                        _ => {
                            let at = rng.random_range(0..=n);
                            b.truncate(at);
                        }
                    }
                }
                b
            }
            // One field replaced by a random value, removed, or an unknown field added.
            1 | 2 => {
                let mut v = valid();
                let obj = v.as_object_mut().unwrap();
                let k = &keys[rng.random_range(0..keys.len())];
                match rng.random_range(0..3) {
                    0 => {
                        obj.remove(k);
                    }
                    1 => {
                        obj.insert("unexpected".into(), random_value(&mut rng, 0));
                    }
                    _ => {
                        obj.insert(k.clone(), random_value(&mut rng, 0));
                    }
                }
                serde_json::to_vec(&v).unwrap()
            }
            // Random JSON and random bytes.
            _ => {
                if rng.random() {
                    serde_json::to_vec(&random_value(&mut rng, 0)).unwrap()
                } else {
                    (0..rng.random_range(0..64)).map(|_| rng.random()).collect()
                }
            }
        };
        if check(&body) {
            accepted += 1;
        } else {
            rejected += 1;
        }
    }
    // Both verdicts occur, so the properties were exercised on each side.
    assert!(
        accepted > 100 && rejected > 10_000,
        "accepted {accepted}, rejected {rejected}"
    );
}
