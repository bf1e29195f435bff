//! [`Config`] from a diffusers `unet/config.json`: missing keys take `UNet2DConditionModel`'s
//! defaults, and every option whose value would change the computation in a way [`super::unet`]
//! does not implement is refused by name.

use serde_json::{Value, json};

use super::unet::Config;

/// Options this implementation computes only at one setting: (key, diffusers' default, the
/// values accepted). A key whose value is outside its list is refused.
fn fixed_options() -> Vec<(&'static str, Value, Vec<Value>)> {
    let n = Value::Null;
    vec![
        ("center_input_sample", json!(false), vec![json!(false)]),
        (
            "mid_block_type",
            json!("UNetMidBlock2DCrossAttn"),
            vec![json!("UNetMidBlock2DCrossAttn")],
        ),
        ("only_cross_attention", json!(false), vec![json!(false)]),
        ("downsample_padding", json!(1), vec![json!(1)]),
        ("mid_block_scale_factor", json!(1), vec![json!(1)]),
        ("act_fn", json!("silu"), vec![json!("silu")]),
        ("encoder_hid_dim", n.clone(), vec![n.clone()]),
        ("encoder_hid_dim_type", n.clone(), vec![n.clone()]),
        ("num_attention_heads", n.clone(), vec![n.clone()]),
        ("dual_cross_attention", json!(false), vec![json!(false)]),
        ("use_linear_projection", json!(false), vec![json!(true)]),
        ("class_embed_type", n.clone(), vec![n.clone()]),
        ("addition_embed_type", n.clone(), vec![json!("text_time")]),
        ("num_class_embeds", n.clone(), vec![n.clone()]),
        ("upcast_attention", json!(false), vec![json!(false), n.clone()]),
        (
            "resnet_time_scale_shift",
            json!("default"),
            vec![json!("default")],
        ),
        ("resnet_skip_time_act", json!(false), vec![json!(false)]),
        ("resnet_out_scale_factor", json!(1), vec![json!(1)]),
        (
            "time_embedding_type",
            json!("positional"),
            vec![json!("positional")],
        ),
        ("time_embedding_act_fn", n.clone(), vec![n.clone()]),
        ("timestep_post_act", n.clone(), vec![n.clone()]),
        ("time_cond_proj_dim", n.clone(), vec![n.clone()]),
        ("conv_in_kernel", json!(3), vec![json!(3)]),
        ("conv_out_kernel", json!(3), vec![json!(3)]),
        ("attention_type", json!("default"), vec![json!("default")]),
        ("class_embeddings_concat", json!(false), vec![json!(false)]),
        (
            "mid_block_only_cross_attention",
            n.clone(),
            vec![n.clone(), json!(false)],
        ),
        ("cross_attention_norm", n.clone(), vec![n.clone()]),
        ("reverse_transformer_layers_per_block", n.clone(), vec![n]),
    ]
}

/// JSON equality with numbers compared by value (`1` == `1.0`).
fn same(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// An int, or a list of ints, as one value per level (`levels` entries).
fn per_level(v: &Value, key: &str, default: Value, levels: usize) -> Result<Vec<i64>, String> {
    let x = v.get(key).filter(|x| !x.is_null()).cloned().unwrap_or(default);
    if let Some(i) = x.as_i64() {
        return Ok(vec![i; levels]);
    }
    let list = x
        .as_array()
        .and_then(|a| a.iter().map(|e| e.as_i64()).collect::<Option<Vec<_>>>())
        .ok_or_else(|| format!("{key} must be an integer or a list of integers (got {x})"))?;
    if list.len() != levels {
        return Err(format!("{key} has {} entries for {levels} levels", list.len()));
    }
    Ok(list)
}

/// An int that may also be given as a list of equal ints (one per level).
fn uniform(v: &Value, key: &str, default: i64, levels: usize) -> Result<i64, String> {
    let list = per_level(v, key, json!(default), levels)?;
    if list.iter().any(|&x| x != list[0]) {
        return Err(format!(
            "{key} = {list:?}: only one value for all levels is implemented"
        ));
    }
    Ok(list[0])
}

fn block_types(
    v: &Value,
    key: &str,
    default: &[&str],
    plain: &str,
    cross: &str,
) -> Result<Vec<bool>, String> {
    let list: Vec<String> = match v.get(key) {
        None | Some(Value::Null) => default.iter().map(|s| s.to_string()).collect(),
        Some(x) => x
            .as_array()
            .and_then(|a| a.iter().map(|e| e.as_str().map(String::from)).collect())
            .ok_or_else(|| format!("{key} must be a list of block type names"))?,
    };
    list.iter()
        .map(|t| match t.as_str() {
            t if t == plain => Ok(false),
            t if t == cross => Ok(true),
            other => Err(format!(
                "{key}: block type {other} is not implemented ({plain} or {cross})"
            )),
        })
        .collect()
}

/// Parses a `UNet2DConditionModel` config (errors name the key).
pub(crate) fn parse(v: &Value) -> Result<Config, String> {
    if let Some(class) = v.get("_class_name").and_then(|c| c.as_str())
        && class != "UNet2DConditionModel"
    {
        return Err(format!("_class_name {class} is not UNet2DConditionModel"));
    }
    let refused: Vec<String> = fixed_options()
        .into_iter()
        .filter_map(|(key, default, accepted)| {
            let got = v.get(key).cloned().unwrap_or(default);
            (!accepted.iter().any(|a| same(a, &got))).then(|| {
                let ok: Vec<String> = accepted.iter().map(|a| a.to_string()).collect();
                format!("{key} = {got} (implemented: {})", ok.join(" or "))
            })
        })
        .collect();
    if !refused.is_empty() {
        return Err(format!("unsupported UNet options: {}", refused.join("; ")));
    }
    let int = |key: &str, default: i64| -> Result<i64, String> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(x) => x
                .as_i64()
                .ok_or_else(|| format!("{key} must be an integer (got {x})")),
        }
    };
    let required = |key: &str| -> Result<i64, String> {
        v.get(key)
            .and_then(|x| x.as_i64())
            .ok_or_else(|| format!("{key} must be an integer (text_time embedding)"))
    };
    let float = |key: &str, default: f64| v.get(key).and_then(|x| x.as_f64()).unwrap_or(default);
    let block_out_channels = match v.get("block_out_channels") {
        None | Some(Value::Null) => vec![320, 640, 1280, 1280],
        Some(x) => x
            .as_array()
            .and_then(|a| a.iter().map(|e| e.as_i64()).collect::<Option<Vec<_>>>())
            .ok_or("block_out_channels must be a list of integers")?,
    };
    let n = block_out_channels.len();
    let down_attention = block_types(
        v,
        "down_block_types",
        &[
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ],
        "DownBlock2D",
        "CrossAttnDownBlock2D",
    )?;
    let up_attention = block_types(
        v,
        "up_block_types",
        &[
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ],
        "UpBlock2D",
        "CrossAttnUpBlock2D",
    )?;
    if v.get("transformer_layers_per_block")
        .and_then(|x| x.as_array())
        .is_some_and(|a| a.iter().any(|e| e.is_array()))
    {
        return Err("transformer_layers_per_block per layer (nested lists) is not implemented".into());
    }
    let norm_num_groups = match v.get("norm_num_groups") {
        Some(Value::Null) => {
            return Err("norm_num_groups = null (no output GroupNorm) is not implemented".into());
        }
        _ => int("norm_num_groups", 32)?,
    };
    let c = Config {
        in_channels: int("in_channels", 4)?,
        out_channels: int("out_channels", 4)?,
        down_attention,
        up_attention,
        layers_per_block: uniform(v, "layers_per_block", 2, n)?,
        transformer_layers_per_block: per_level(v, "transformer_layers_per_block", json!(1), n)?,
        num_attention_heads: per_level(v, "attention_head_dim", json!(8), n)?,
        cross_attention_dim: uniform(v, "cross_attention_dim", 1280, n)?,
        norm_num_groups,
        norm_eps: float("norm_eps", 1e-5),
        time_embedding_dim: int(
            "time_embedding_dim",
            4 * block_out_channels.first().copied().unwrap_or(0),
        )?,
        flip_sin_to_cos: v.get("flip_sin_to_cos").and_then(|x| x.as_bool()).unwrap_or(true),
        freq_shift: float("freq_shift", 0.0),
        addition_time_embed_dim: required("addition_time_embed_dim")?,
        projection_class_embeddings_input_dim: required("projection_class_embeddings_input_dim")?,
        block_out_channels,
    };
    c.validate().map_err(|e| e.to_string())?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// stabilityai/stable-diffusion-xl-base-1.0 `unet/config.json`.
    const SDXL_BASE: &str = r#"{
      "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0",
      "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
      "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
      "block_out_channels": [320, 640, 1280], "center_input_sample": false,
      "class_embed_type": null, "class_embeddings_concat": false, "conv_in_kernel": 3,
      "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": null,
      "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
      "downsample_padding": 1, "dual_cross_attention": false, "encoder_hid_dim": null,
      "encoder_hid_dim_type": null, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
      "layers_per_block": 2, "mid_block_only_cross_attention": null, "mid_block_scale_factor": 1,
      "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
      "num_attention_heads": null, "num_class_embeds": null, "only_cross_attention": false,
      "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
      "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": false,
      "resnet_time_scale_shift": "default", "sample_size": 128, "time_cond_proj_dim": null,
      "time_embedding_act_fn": null, "time_embedding_dim": null,
      "time_embedding_type": "positional", "timestep_post_act": null,
      "transformer_layers_per_block": [1, 2, 10],
      "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
      "upcast_attention": null, "use_linear_projection": true
    }"#;

    fn base() -> Value {
        serde_json::from_str(SDXL_BASE).unwrap()
    }

    #[test]
    fn sdxl_base_config_json_parses_to_the_sdxl_base_preset() {
        assert_eq!(parse(&base()).unwrap(), Config::sdxl_base());
    }

    /// Each unimplemented option is refused with its name, also when several are set.
    #[test]
    fn unimplemented_options_are_refused_by_name() {
        for (key, value, expect) in [
            (
                "resnet_time_scale_shift",
                json!("scale_shift"),
                "resnet_time_scale_shift",
            ),
            ("use_linear_projection", json!(false), "use_linear_projection"),
            ("class_embed_type", json!("timestep"), "class_embed_type"),
            ("upcast_attention", json!(true), "upcast_attention"),
            ("addition_embed_type", json!("text"), "addition_embed_type"),
            ("time_cond_proj_dim", json!(256), "time_cond_proj_dim"),
            ("mid_block_scale_factor", json!(1.5), "mid_block_scale_factor"),
            (
                "down_block_types",
                json!(["DownBlock2D", "SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
                "SimpleCrossAttnDownBlock2D",
            ),
            (
                "transformer_layers_per_block",
                json!([[1], [2, 2], [10, 10]]),
                "nested",
            ),
            ("layers_per_block", json!([2, 2, 3]), "layers_per_block"),
            ("norm_num_groups", Value::Null, "norm_num_groups"),
        ] {
            let mut v = base();
            v[key] = value;
            let err = parse(&v).unwrap_err();
            assert!(err.contains(expect), "{key}: {err}");
        }
        let mut v = base();
        v["conv_in_kernel"] = json!(7);
        v["attention_type"] = json!("gated");
        let err = parse(&v).unwrap_err();
        assert!(
            err.contains("conv_in_kernel = 7") && err.contains("attention_type"),
            "{err}"
        );
    }

    /// Diffusers' own defaults fill a minimal config; an unset `use_linear_projection` means
    /// convolution projections there, so it must be given.
    #[test]
    fn missing_keys_take_diffusers_defaults() {
        let v = json!({
            "addition_embed_type": "text_time", "use_linear_projection": true,
            "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
            "block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048
        });
        assert_eq!(parse(&v).unwrap(), Config::sdxl_base());
        let mut v = v;
        v.as_object_mut().unwrap().remove("use_linear_projection");
        assert!(parse(&v).unwrap_err().contains("use_linear_projection"));
    }
}
