//! Key mapping from the diffusers `FluxTransformer2DModel` layout onto the original (BFL)
//! single-file layout this crate uses internally: split q/k/v (and single blocks' `proj_mlp`) are
//! concatenated into the fused projections; `norm_out.linear` (scale, shift) is swapped into
//! `final_layer.adaLN_modulation.1` (shift, scale).

use super::weights::Source;

/// Maps an original-layout variable name to its diffusers source tensor(s).
pub fn diffusers_source(name: &str) -> Source {
    let key = |s: String| Source::Key(s);
    let (stem, leaf) = match name.rsplit_once('.') {
        Some(x) => x,
        None => return key(name.to_string()),
    };
    let fixed = match stem {
        "img_in" => Some("x_embedder"),
        "txt_in" => Some("context_embedder"),
        "time_in.in_layer" => Some("time_text_embed.timestep_embedder.linear_1"),
        "time_in.out_layer" => Some("time_text_embed.timestep_embedder.linear_2"),
        "guidance_in.in_layer" => Some("time_text_embed.guidance_embedder.linear_1"),
        "guidance_in.out_layer" => Some("time_text_embed.guidance_embedder.linear_2"),
        "vector_in.in_layer" => Some("time_text_embed.text_embedder.linear_1"),
        "vector_in.out_layer" => Some("time_text_embed.text_embedder.linear_2"),
        "final_layer.linear" => Some("proj_out"),
        "final_layer.adaLN_modulation.1" => {
            return Source::SwapHalves(format!("norm_out.linear.{leaf}"));
        }
        _ => None,
    };
    if let Some(f) = fixed {
        return key(format!("{f}.{leaf}"));
    }
    let parts: Vec<&str> = stem.splitn(3, '.').collect();
    if parts.len() == 3 && parts[0] == "double_blocks" {
        let p = format!("transformer_blocks.{}", parts[1]);
        let qkv = |a: &str, b: &str, c: &str| {
            Source::Concat(vec![
                format!("{p}.attn.{a}.{leaf}"),
                format!("{p}.attn.{b}.{leaf}"),
                format!("{p}.attn.{c}.{leaf}"),
            ])
        };
        return match parts[2] {
            "img_mod.lin" => key(format!("{p}.norm1.linear.{leaf}")),
            "txt_mod.lin" => key(format!("{p}.norm1_context.linear.{leaf}")),
            "img_attn.qkv" => qkv("to_q", "to_k", "to_v"),
            "txt_attn.qkv" => qkv("add_q_proj", "add_k_proj", "add_v_proj"),
            "img_attn.norm.query_norm" => key(format!("{p}.attn.norm_q.weight")),
            "img_attn.norm.key_norm" => key(format!("{p}.attn.norm_k.weight")),
            "txt_attn.norm.query_norm" => key(format!("{p}.attn.norm_added_q.weight")),
            "txt_attn.norm.key_norm" => key(format!("{p}.attn.norm_added_k.weight")),
            "img_attn.proj" => key(format!("{p}.attn.to_out.0.{leaf}")),
            "txt_attn.proj" => key(format!("{p}.attn.to_add_out.{leaf}")),
            "img_mlp.0" => key(format!("{p}.ff.net.0.proj.{leaf}")),
            "img_mlp.2" => key(format!("{p}.ff.net.2.{leaf}")),
            "txt_mlp.0" => key(format!("{p}.ff_context.net.0.proj.{leaf}")),
            "txt_mlp.2" => key(format!("{p}.ff_context.net.2.{leaf}")),
            _ => key(name.to_string()),
        };
    }
    if parts.len() == 3 && parts[0] == "single_blocks" {
        let p = format!("single_transformer_blocks.{}", parts[1]);
        return match parts[2] {
            "linear1" => Source::Concat(vec![
                format!("{p}.attn.to_q.{leaf}"),
                format!("{p}.attn.to_k.{leaf}"),
                format!("{p}.attn.to_v.{leaf}"),
                format!("{p}.proj_mlp.{leaf}"),
            ]),
            "linear2" => key(format!("{p}.proj_out.{leaf}")),
            "modulation.lin" => key(format!("{p}.norm.linear.{leaf}")),
            "norm.query_norm" => key(format!("{p}.attn.norm_q.weight")),
            "norm.key_norm" => key(format!("{p}.attn.norm_k.weight")),
            _ => key(name.to_string()),
        };
    }
    key(name.to_string())
}
