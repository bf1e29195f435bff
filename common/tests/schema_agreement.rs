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
            "seed": 42, "priority": "high", "deadline": "2030-01-01T00:00:00Z", "reply_to": "reply.svc",
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
        ("job id ..", with(json!({"job_id": ".."})), false),
        ("job id .", with(json!({"job_id": "."})), false),
        ("hidden job id", with(json!({"job_id": ".x"})), false),
        ("job id with a separator", with(json!({"job_id": "a/b"})), false),
        ("job id with a backslash", with(json!({"job_id": "a\\b"})), false),
        ("job id like a flag", with(json!({"job_id": "-x"})), false),
        ("job id with inner dots", with(json!({"job_id": "a..b"})), true),
        (
            "job id shaped like a redis key",
            with(json!({"job_id": "ditfleet:job:x"})),
            true,
        ),
        ("tenant ..", with(json!({"tenant": ".."})), false),
        ("model version ..", with(json!({"model_version": ".."})), false),
        (
            "hidden model version",
            with(json!({"model_version": ".v1"})),
            false,
        ),
        ("long job id", with(json!({"job_id": "a".repeat(129)})), false),
        ("bad tenant", with(json!({"tenant": "a/b"})), false),
        ("bad model version", with(json!({"model_version": "v 1"})), false),
        ("bad reply_to", with(json!({"reply_to": "job.#"})), false),
        (
            "reply_to as another job's event key",
            with(json!({"reply_to": "job.victim.done"})),
            false,
        ),
        (
            "reply_to outside the reply namespace",
            with(json!({"reply_to": "svc.replies"})),
            false,
        ),
        (
            "reply_to prefix alone",
            with(json!({"reply_to": "reply."})),
            false,
        ),
        (
            "reply_to with a dot after the prefix",
            with(json!({"reply_to": "reply..x"})),
            false,
        ),
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
        ("sdxl minimal", with(json!({"model": "sdxl-base"})), true),
        (
            "sdxl with every new field",
            with(
                json!({"model": "sdxl-base", "negative_prompt": "blurry", "guidance": 7.5,
                "steps": 30, "scheduler": "dpmpp_2m_karras",
                "loras": [{"name": "pixel-art", "version": "v1.2", "scale": 0.8},
                          {"name": "0style", "version": "2024_01"}]}),
            ),
            true,
        ),
        (
            "flux with its sampler and loras",
            with(json!({"scheduler": "flow_euler", "loras": [{"name": "a", "version": "1", "scale": -1}]})),
            true,
        ),
        (
            "sdxl with a negative prompt and no true cfg",
            with(json!({"model": "sdxl-base", "negative_prompt": "blurry"})),
            true,
        ),
        (
            "sdxl with a blank negative prompt",
            with(json!({"model": "sdxl-base", "negative_prompt": "  "})),
            true,
        ),
        (
            "sdxl with true cfg",
            with(json!({"model": "sdxl-base", "true_cfg_scale": 4.0, "negative_prompt": "blurry"})),
            false,
        ),
        (
            "sdxl with true cfg and no negative prompt",
            with(json!({"model": "sdxl-base", "true_cfg_scale": 1.5})),
            false,
        ),
        (
            "sdxl with true cfg 1",
            with(json!({"model": "sdxl-base", "true_cfg_scale": 1.0})),
            true,
        ),
        (
            "sdxl with true cfg null",
            with(json!({"model": "sdxl-base", "true_cfg_scale": null})),
            true,
        ),
        (
            "flux with an sdxl sampler",
            with(json!({"scheduler": "euler"})),
            false,
        ),
        (
            "schnell with an sdxl sampler",
            with(json!({"model": "flux-schnell", "scheduler": "dpmpp_2m"})),
            false,
        ),
        (
            "sdxl with flux's sampler",
            with(json!({"model": "sdxl-base", "scheduler": "flow_euler"})),
            false,
        ),
        (
            "unknown sampler",
            with(json!({"model": "sdxl-base", "scheduler": "ddim"})),
            false,
        ),
        (
            "sampler in capitals",
            with(json!({"model": "sdxl-base", "scheduler": "EULER"})),
            false,
        ),
        ("sampler not a string", with(json!({"scheduler": 1})), false),
        ("no loras", with(json!({"loras": []})), true),
        (
            "loras not a list",
            with(json!({"loras": {"name": "a", "version": "1"}})),
            false,
        ),
        ("lora not an object", with(json!({"loras": ["a@1"]})), false),
        (
            "lora without a version",
            with(json!({"loras": [{"name": "a"}]})),
            false,
        ),
        (
            "lora without a name",
            with(json!({"loras": [{"version": "1"}]})),
            false,
        ),
        (
            "lora with an unknown key",
            with(json!({"loras": [{"name": "a", "version": "1", "weight": 1}]})),
            false,
        ),
        (
            "lora scale as a string",
            with(json!({"loras": [{"name": "a", "version": "1", "scale": "1"}]})),
            false,
        ),
        (
            "lora name as a number",
            with(json!({"loras": [{"name": 7, "version": "1"}]})),
            false,
        ),
        (
            "identical loras twice",
            with(json!({"loras": [{"name": "a", "version": "1"}, {"name": "a", "version": "1"}]})),
            false,
        ),
        (
            "same adapter in two versions",
            with(json!({"loras": [{"name": "a", "version": "1"}, {"name": "a", "version": "2"}]})),
            true,
        ),
    ];
    let mut cases: Vec<(String, Value, bool)> =
        cases.into_iter().map(|(n, d, e)| (n.to_string(), d, e)).collect();
    cases.extend(generated_cases());
    for (name, doc, expected) in cases {
        let by_schema = validator.is_valid(&doc);
        let by_rust = rust_accepts(&doc);
        assert_eq!(by_schema, expected, "schema verdict for case {name:?}");
        assert_eq!(by_rust, expected, "rust verdict for case {name:?}");
    }
}

/// The classes of input where schema and Rust once disagreed, generated per field: `null` for
/// every optional field, integral floats for every integer, every numeric bound and every length
/// limit at the edge and one past it, and strings of only whitespace or invisible characters.
fn generated_cases() -> Vec<(String, Value, bool)> {
    let mut out = Vec::new();
    let mut case = |name: String, patch: Value, ok: bool| {
        let mut v = base();
        for (k, val) in patch.as_object().unwrap() {
            v[k] = val.clone();
        }
        out.push((name, v, ok));
    };
    // null means absent for every optional field (true_cfg_scale: null needs no negative prompt).
    for field in [
        "model_version",
        "negative_prompt",
        "true_cfg_scale",
        "plan",
        "steps",
        "guidance",
        "seed",
        "priority",
        "deadline",
        "reply_to",
        "labels",
        "scheduler",
        "loras",
    ] {
        case(format!("{field}: null"), json!({ field: null }), true);
    }
    case(
        "lora scale: null".into(),
        json!({"loras": [{"name": "a", "version": "1", "scale": null}]}),
        true,
    );
    for field in ["name", "version"] {
        case(
            format!("lora {field}: null"),
            json!({"loras": [{"name": "a", "version": "1", field: null}]}),
            false,
        );
    }
    // A LoRA's name and version: the model-version rule (they become folders / object keys).
    for (field, other) in [("name", "version"), ("version", "name")] {
        let entry = |v: Value| json!({"loras": [{ field: v, other: "v1" }]});
        for (v, ok) in [
            ("a".to_string(), true),
            ("0".to_string(), true),
            ("pixel-art_v1.2".to_string(), true),
            ("a..b".to_string(), true),
            ("x.".to_string(), true),
            ("a".repeat(64), true),
            ("a".repeat(65), false),
            (String::new(), false),
            (".".to_string(), false),
            ("..".to_string(), false),
            (".hidden".to_string(), false),
            ("-x".to_string(), false),
            ("_x".to_string(), false),
            ("a/b".to_string(), false),
            ("../x".to_string(), false),
            ("a\\b".to_string(), false),
            ("a b".to_string(), false),
            ("a:b".to_string(), false),
            ("a@b".to_string(), false),
            ("a*".to_string(), false),
            ("é".to_string(), false),
            ("a\0b".to_string(), false),
        ] {
            case(format!("lora {field} {v:?}"), entry(json!(v)), ok);
        }
    }
    // At most 8 entries.
    let loras = |n: usize| {
        (0..n)
            .map(|i| json!({"name": format!("l{i}"), "version": "1"}))
            .collect::<Vec<_>>()
    };
    case("8 loras".into(), json!({"loras": loras(8)}), true);
    case("9 loras".into(), json!({"loras": loras(9)}), false);
    for field in [
        "schema_version",
        "job_id",
        "tenant",
        "model",
        "prompt",
        "width",
        "height",
    ] {
        case(format!("required {field}: null"), json!({ field: null }), false);
    }
    // Integral floats are integers; fractions are not.
    case("width 256.0".into(), json!({"width": 256.0}), true);
    case("height 1024.0".into(), json!({"height": 1024.0}), true);
    case("steps 28.0".into(), json!({"steps": 28.0}), true);
    case("seed 42.0".into(), json!({"seed": 42.0}), true);
    case("schema_version 1.0".into(), json!({"schema_version": 1.0}), true);
    case("width 256.5".into(), json!({"width": 256.5}), false);
    case("steps 2.5".into(), json!({"steps": 2.5}), false);
    case("seed 0.5".into(), json!({"seed": 0.5}), false);
    // Numeric bounds, at the edge and one past.
    for (field, lo, hi) in [("width", 256, 4096), ("height", 256, 4096)] {
        case(format!("{field} {lo}"), json!({ field: lo }), true);
        case(format!("{field} {hi}"), json!({ field: hi }), true);
        case(format!("{field} {}", lo - 16), json!({ field: lo - 16 }), false);
        case(format!("{field} {}", hi + 16), json!({ field: hi + 16 }), false);
        case(format!("{field} {}", lo + 1), json!({ field: lo + 1 }), false);
    }
    for (v, ok) in [(0, false), (1, true), (100, true), (101, false)] {
        case(format!("steps {v}"), json!({ "steps": v }), ok);
    }
    for (v, ok) in [
        (-0.001, false),
        (0.0, true),
        (30.0, true),
        (30.001, false),
        (30.0000001, false),
    ] {
        case(format!("guidance {v}"), json!({ "guidance": v }), ok);
    }
    for (v, ok) in [(0.999, false), (1.0, true), (20.0, true), (20.0000001, false)] {
        case(
            format!("true_cfg_scale {v}"),
            json!({ "true_cfg_scale": v, "negative_prompt": "blurry" }),
            ok,
        );
    }
    for (v, ok) in [
        (-4.0000001, false),
        (-4.0, true),
        (-0.5, true),
        (0.0, true),
        (1.0, true),
        (4.0, true),
        (4.0000001, false),
        (5.0, false),
    ] {
        case(
            format!("lora scale {v}"),
            json!({"loras": [{"name": "a", "version": "1", "scale": v}]}),
            ok,
        );
    }
    case(
        "lora scale 2 (an integer)".into(),
        json!({"loras": [{"name": "a", "version": "1", "scale": 2}]}),
        true,
    );
    case("seed 0".into(), json!({"seed": 0}), true);
    case("seed 2^64-1".into(), json!({"seed": u64::MAX}), true);
    let two_pow_64: Value = serde_json::from_str("18446744073709551616").unwrap();
    case("seed 2^64".into(), json!({ "seed": two_pow_64 }), false);
    case("seed -1".into(), json!({"seed": -1}), false);
    // Length limits, at the edge and one past.
    let text = |n: usize| "a".repeat(n);
    for (field, max) in [("job_id", 128), ("tenant", 64), ("model_version", 64)] {
        case(format!("{field} of {max}"), json!({ field: text(max) }), true);
        case(
            format!("{field} of {}", max + 1),
            json!({ field: text(max + 1) }),
            false,
        );
    }
    case(
        "reply_to of 200".into(),
        json!({"reply_to": format!("reply.{}", text(194))}),
        true,
    );
    case(
        "reply_to of 201".into(),
        json!({"reply_to": format!("reply.{}", text(195))}),
        false,
    );
    case("prompt of 10000".into(), json!({"prompt": text(10_000)}), true);
    case("prompt of 10001".into(), json!({"prompt": text(10_001)}), false);
    case(
        "negative_prompt of 10000".into(),
        json!({"negative_prompt": text(10_000)}),
        true,
    );
    case(
        "negative_prompt of 10001".into(),
        json!({"negative_prompt": text(10_001)}),
        false,
    );
    let plan = ["ring=64"; 12].join(",");
    assert_eq!(plan.len() + ",dp=1".len(), 100);
    case(
        "plan of 100".into(),
        json!({"plan": format!("{plan},dp=1")}),
        true,
    );
    case(
        "plan of 101".into(),
        json!({"plan": format!("{plan},dp=10")}),
        false,
    );
    let labels = |n: usize| {
        (0..n)
            .map(|i| (format!("k{i}"), json!("v")))
            .collect::<serde_json::Map<_, _>>()
    };
    case("32 labels".into(), json!({"labels": labels(32)}), true);
    case("33 labels".into(), json!({"labels": labels(33)}), false);
    case("label key of 64".into(), json!({"labels": {text(64): "v"}}), true);
    case(
        "label key of 65".into(),
        json!({"labels": {text(65): "v"}}),
        false,
    );
    case(
        "label value of 256".into(),
        json!({"labels": {"k": text(256)}}),
        true,
    );
    case(
        "label value of 257".into(),
        json!({"labels": {"k": text(257)}}),
        false,
    );
    // Text that is only whitespace or invisible characters is blank.
    for (name, blank) in [
        ("spaces", "   "),
        ("tab and newline", "\t\n"),
        ("zero-width space", "\u{200b}"),
        ("zero-width joiners", "\u{200c}\u{200d}"),
        ("word joiner", "\u{2060}"),
        ("byte-order mark", "\u{feff}"),
        ("no-break and ideographic spaces", "\u{a0}\u{3000}"),
        ("next line", "\u{85}"),
        ("mongolian vowel separator", "\u{180e}"),
    ] {
        case(format!("prompt of {name}"), json!({ "prompt": blank }), false);
        case(
            format!("true cfg with a negative prompt of {name}"),
            json!({ "true_cfg_scale": 4.0, "negative_prompt": blank }),
            false,
        );
        case(
            format!("prompt of {name} around a word"),
            json!({ "prompt": format!("{blank}fox{blank}") }),
            true,
        );
    }
    out
}

/// The one rule the schema cannot state: JSON Schema compares whole array items (`uniqueItems`),
/// not fields across items, so two entries naming the same adapter with different scales (or one
/// with `scale` left out and one with 1) pass the schema, and only the Rust validation (the
/// scheduler, `ditfleetctl submit`) rejects them. Documented in docs/message-contract.md; this
/// test fails if the list of such cases grows or the schema learns to reject them.
#[test]
fn duplicate_lora_pairs_are_the_only_rule_the_schema_leaves_to_rust() {
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(SCHEMA_PATH).unwrap()).unwrap();
    let validator = jsonschema::options().build(&schema).expect("schema compiles");
    for loras in [
        json!([{"name": "a", "version": "1", "scale": 0.5}, {"name": "a", "version": "1", "scale": 0.8}]),
        json!([{"name": "a", "version": "1"}, {"name": "a", "version": "1", "scale": 1.0}]),
        json!([{"name": "a", "version": "1"}, {"name": "b", "version": "1"}, {"name": "a", "version": "1", "scale": null}]),
    ] {
        let doc = with(json!({ "loras": loras }));
        assert!(validator.is_valid(&doc), "schema: {doc}");
        let err = JobSpec::parse(doc.to_string().as_bytes())
            .unwrap()
            .validate(&Limits::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("loras: entries 0 and"), "rust: {err}");
    }
}

#[test]
fn the_schemas_model_enum_is_the_known_models_list_and_its_description_names_each() {
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(SCHEMA_PATH).unwrap()).unwrap();
    let model = &schema["properties"]["model"];
    let listed: Vec<&str> = model["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(listed, ditfleet_common::job::KNOWN_MODELS);
    let description = model["description"].as_str().unwrap();
    for m in ditfleet_common::job::KNOWN_MODELS {
        assert!(description.contains(&format!("`{m}`")), "{description}");
    }
}
