//! The published JSON Schema (docs/job-v1.schema.json) and the Rust contract agree.

use ditfleet_common::job::{JobSpec, Limits, SCHEMA_MAX_PROMPT_CHARS};
use serde_json::{Value, json};

const SCHEMA_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/job-v1.schema.json");

fn generated() -> Value {
    serde_json::to_value(schemars::schema_for!(JobSpec)).unwrap()
}

#[test]
fn committed_schema_file_is_the_one_generated_from_the_rust_types() {
    let gen_text = serde_json::to_string_pretty(&generated()).unwrap() + "\n";
    if std::env::var("DITFLEET_UPDATE_SCHEMA").is_ok() {
        std::fs::write(SCHEMA_PATH, &gen_text).unwrap();
    }
    let committed = std::fs::read_to_string(SCHEMA_PATH).expect("docs/job-v1.schema.json exists");
    assert_eq!(
        committed, gen_text,
        "docs/job-v1.schema.json is stale: run `DITFLEET_UPDATE_SCHEMA=1 cargo test -p ditfleet-common --test schema_agreement`"
    );
}

fn base() -> Value {
    json!({"schema_version": 1, "job_id": "j-1", "tenant": "acme", "model": "flux-dev",
           "prompt": "a watercolour harbour", "width": 1024, "height": 768})
}

fn with(patch: Value) -> Value {
    let mut v = base();
    for (k, val) in patch.as_object().unwrap() {
        if val.is_null() {
            v.as_object_mut().unwrap().remove(k);
        } else {
            v[k] = val.clone();
        }
    }
    v
}

/// Rust verdict with limits at the schema's own caps (the scheduler may configure lower ones).
fn rust_accepts(v: &Value) -> bool {
    let limits = Limits {
        max_prompt_chars: SCHEMA_MAX_PROMPT_CHARS,
    };
    match JobSpec::parse(v.to_string().as_bytes()) {
        Ok(spec) => spec.validate(&limits).is_ok(),
        Err(_) => false,
    }
}

#[test]
fn schema_and_rust_validation_give_the_same_verdict_on_every_case() {
    let schema_text = std::fs::read_to_string(SCHEMA_PATH).unwrap();
    let schema: Value = serde_json::from_str(&schema_text).unwrap();
    let validator = jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("schema compiles");
    let cases: Vec<(&str, Value, bool)> = vec![
        ("minimal", base(), true),
        (
            "all fields",
            with(
                json!({"model_version": "2024-08", "negative_prompt": "blur", "steps": 28, "guidance": 3.5,
            "seed": 42, "priority": "high", "deadline": "2030-01-01T00:00:00Z", "reply_to": "svc.replies",
            "labels": {"team/app": "x"}}),
            ),
            true,
        ),
        (
            "schnell",
            with(json!({"model": "flux-schnell", "steps": 4})),
            true,
        ),
        (
            "edges",
            with(json!({"width": 256, "height": 4096, "steps": 1, "guidance": 0.0})),
            true,
        ),
        ("max steps", with(json!({"steps": 100, "guidance": 30.0})), true),
        ("version 2", with(json!({"schema_version": 2})), false),
        ("missing prompt", with(json!({"prompt": null})), false),
        ("empty prompt", with(json!({"prompt": ""})), false),
        ("unknown field", with(json!({"colour": "red"})), false),
        ("unknown model", with(json!({"model": "sdxl"})), false),
        ("width not multiple of 16", with(json!({"width": 1000})), false),
        ("width too small", with(json!({"width": 240})), false),
        ("height too large", with(json!({"height": 4112})), false),
        ("width as string", with(json!({"width": "1024"})), false),
        ("steps zero", with(json!({"steps": 0})), false),
        ("steps 101", with(json!({"steps": 101})), false),
        ("guidance negative", with(json!({"guidance": -1.0})), false),
        ("guidance 31", with(json!({"guidance": 31.0})), false),
        ("bad priority", with(json!({"priority": "urgent"})), false),
        ("negative seed", with(json!({"seed": -3})), false),
        ("bad job id", with(json!({"job_id": "has space"})), false),
        ("long job id", with(json!({"job_id": "a".repeat(129)})), false),
        ("bad tenant", with(json!({"tenant": "a/b"})), false),
        ("bad model version", with(json!({"model_version": "v 1"})), false),
        ("bad reply_to", with(json!({"reply_to": "job.#"})), false),
        ("bad deadline", with(json!({"deadline": "next week"})), false),
        (
            "prompt at schema cap",
            with(json!({"prompt": "p".repeat(SCHEMA_MAX_PROMPT_CHARS)})),
            true,
        ),
        (
            "prompt over schema cap",
            with(json!({"prompt": "p".repeat(SCHEMA_MAX_PROMPT_CHARS + 1)})),
            false,
        ),
        (
            "too many labels",
            with(
                json!({"labels": (0..33).map(|i| (format!("k{i}"), json!("v"))).collect::<serde_json::Map<_, _>>()}),
            ),
            false,
        ),
        (
            "label key with space",
            with(json!({"labels": {"a b": "v"}})),
            false,
        ),
        (
            "label value too long",
            with(json!({"labels": {"k": "v".repeat(257)}})),
            false,
        ),
        ("label value not string", with(json!({"labels": {"k": 1}})), false),
        (
            "true cfg with a negative prompt",
            with(json!({"true_cfg_scale": 4.0, "negative_prompt": "blurry"})),
            true,
        ),
        (
            "true cfg scale 1 alone",
            with(json!({"true_cfg_scale": 1.0})),
            true,
        ),
        (
            "true cfg without a negative prompt",
            with(json!({"true_cfg_scale": 4.0})),
            false,
        ),
        (
            "true cfg with a blank negative prompt",
            with(json!({"true_cfg_scale": 4.0, "negative_prompt": "  "})),
            false,
        ),
        (
            "true cfg scale below 1",
            with(json!({"true_cfg_scale": 0.5, "negative_prompt": "x"})),
            false,
        ),
        (
            "true cfg scale above 20",
            with(json!({"true_cfg_scale": 21.0, "negative_prompt": "x"})),
            false,
        ),
        ("plan single", with(json!({"plan": "single"})), true),
        ("plan ulysses", with(json!({"plan": "ulysses=2"})), true),
        (
            "plan with every item",
            with(json!({"plan": "dp=1,cfg=2,pipefusion=4,patches=8,warmup=2,text=split,vae=single"})),
            true,
        ),
        ("plan degree 64", with(json!({"plan": "ring=64"})), true),
        ("plan degree 65", with(json!({"plan": "ring=65"})), false),
        ("plan degree 0", with(json!({"plan": "ring=0"})), false),
        ("plan leading zero", with(json!({"plan": "ring=02"})), false),
        ("plan plus sign", with(json!({"plan": "ring=+2"})), false),
        ("plan unknown item", with(json!({"plan": "warp=2"})), false),
        ("plan bare name", with(json!({"plan": "ulysses"})), false),
        ("plan empty", with(json!({"plan": ""})), false),
        ("plan trailing comma", with(json!({"plan": "ulysses=2,"})), false),
        ("plan bad text", with(json!({"plan": "text=both"})), false),
    ];
    for (name, doc, expected) in cases {
        let by_schema = validator.is_valid(&doc);
        let by_rust = rust_accepts(&doc);
        assert_eq!(by_schema, expected, "schema verdict for case {name:?}");
        assert_eq!(by_rust, expected, "rust verdict for case {name:?}");
    }
}
