//! Key names of the original single-file SDXL checkpoint (`sd_xl_base_1.0.safetensors`) for the
//! variables of the text encoders and the VAE decoder, which carry diffusers/transformers names.
//! The mapping is diffusers' (`diffusers/loaders/single_file_utils.py`: `convert_ldm_clip_checkpoint`,
//! `convert_open_clip_checkpoint`, `convert_ldm_vae_checkpoint`) run backwards, one variable at a
//! time, so a strict load reports missing keys under their original names.

use crate::flux::weights::Source;

/// CLIP-L (`text_encoder`), stored with transformers' names under this prefix.
pub const CLIP_L: &str = "conditioner.embedders.0.transformer.";
/// OpenCLIP ViT-bigG (`text_encoder_2`) with OpenCLIP's names.
pub const OPEN_CLIP: &str = "conditioner.embedders.1.model.";
/// The VAE with the original (ldm) names.
pub const VAE: &str = "first_stage_model.";

/// `text_encoder` variable (`text_model.…`) -> its key.
pub fn clip_l(name: &str) -> Source {
    Source::Key(format!("{CLIP_L}{name}"))
}

/// Keys under [`CLIP_L`] that no variable reads: the legacy `position_ids` buffer.
pub fn clip_l_ignored(key: &str) -> bool {
    !key.starts_with(CLIP_L) || key.ends_with("embeddings.position_ids")
}

/// `text_encoder_2` variable -> its OpenCLIP source. `hidden` is the model width: q, k and v are
/// consecutive row blocks of that size in the fused `attn.in_proj_weight`/`in_proj_bias`.
pub fn open_clip(name: &str, hidden: i64) -> Source {
    let key = |k: &str| Source::Key(format!("{OPEN_CLIP}{k}"));
    match name {
        "text_model.embeddings.token_embedding.weight" => return key("token_embedding.weight"),
        "text_model.embeddings.position_embedding.weight" => return key("positional_embedding"),
        // Stored (hidden, projection): applied as `x @ text_projection`, not as a Linear.
        "text_projection.weight" => return Source::Transposed(format!("{OPEN_CLIP}text_projection")),
        _ => {}
    }
    if let Some(leaf) = name.strip_prefix("text_model.final_layer_norm.") {
        return key(&format!("ln_final.{leaf}"));
    }
    let Some((layer, rest)) = name
        .strip_prefix("text_model.encoder.layers.")
        .and_then(|r| r.split_once('.'))
    else {
        // Not an OpenCLIP variable: reported missing under this name.
        return key(name);
    };
    let block = format!("{OPEN_CLIP}transformer.resblocks.{layer}.");
    for (i, proj) in ["q_proj", "k_proj", "v_proj"].into_iter().enumerate() {
        if let Some(leaf) = rest.strip_prefix(&format!("self_attn.{proj}.")) {
            return Source::Rows {
                key: format!("{block}attn.in_proj_{leaf}"),
                start: i as i64 * hidden,
                len: hidden,
            };
        }
    }
    let renamed = [
        ("self_attn.out_proj.", "attn.out_proj."),
        ("layer_norm1.", "ln_1."),
        ("layer_norm2.", "ln_2."),
        ("mlp.fc1.", "mlp.c_fc."),
        ("mlp.fc2.", "mlp.c_proj."),
    ]
    .into_iter()
    .find_map(|(from, to)| rest.strip_prefix(from).map(|leaf| format!("{to}{leaf}")))
    .unwrap_or_else(|| rest.to_string());
    Source::Key(format!("{block}{renamed}"))
}

/// Keys under [`OPEN_CLIP`] that no variable reads: CLIP's contrastive temperature.
pub fn open_clip_ignored(key: &str) -> bool {
    !key.starts_with(OPEN_CLIP) || key == format!("{OPEN_CLIP}logit_scale")
}

/// A diffusers `AutoencoderKL` variable -> its original key, for a VAE of `n_blocks` blocks
/// (the decoder's up blocks are numbered in reverse there). The mid-block attention's
/// projections are 1x1 convolutions in the original, linear layers in diffusers.
pub fn vae(name: &str, n_blocks: usize) -> Source {
    let ldm = vae_name(name, n_blocks);
    let conv_attention = [".q.weight", ".k.weight", ".v.weight", ".proj_out.weight"]
        .iter()
        .any(|s| ldm.contains(".mid.attn_1") && ldm.ends_with(s));
    if conv_attention {
        Source::Squeezed(format!("{VAE}{ldm}"))
    } else {
        Source::Key(format!("{VAE}{ldm}"))
    }
}

/// Keys under [`VAE`] that the decoder does not read: the encoder half.
pub fn vae_decoder_ignored(key: &str) -> bool {
    match key.strip_prefix(VAE) {
        Some(k) => k.starts_with("encoder.") || k.starts_with("quant_conv."),
        None => true,
    }
}

/// The original name of a diffusers VAE parameter (without [`VAE`]).
fn vae_name(name: &str, n_blocks: usize) -> String {
    let Some((part, rest)) = name.split_once('.') else {
        return name.to_string();
    };
    if part != "encoder" && part != "decoder" {
        return name.to_string(); // quant_conv, post_quant_conv
    }
    let resnet = |s: &str| s.replacen("conv_shortcut.", "nin_shortcut.", 1);
    let mapped = if let Some(leaf) = rest.strip_prefix("conv_norm_out.") {
        format!("norm_out.{leaf}")
    } else if let Some(r) = rest.strip_prefix("mid_block.resnets.") {
        match r.split_once('.') {
            Some((i, leaf)) => match i.parse::<usize>() {
                Ok(i) => format!("mid.block_{}.{}", i + 1, resnet(leaf)),
                Err(_) => rest.to_string(),
            },
            None => rest.to_string(),
        }
    } else if let Some(r) = rest.strip_prefix("mid_block.attentions.0.") {
        let r = [
            ("group_norm.", "norm."),
            ("to_q.", "q."),
            ("to_k.", "k."),
            ("to_v.", "v."),
            ("to_out.0.", "proj_out."),
        ]
        .into_iter()
        .find_map(|(from, to)| r.strip_prefix(from).map(|leaf| format!("{to}{leaf}")))
        .unwrap_or_else(|| r.to_string());
        format!("mid.attn_1.{r}")
    } else if let Some((kind, r)) = rest
        .strip_prefix("down_blocks.")
        .map(|r| ("down", r))
        .or_else(|| rest.strip_prefix("up_blocks.").map(|r| ("up", r)))
    {
        let Some((i, r)) = r.split_once('.') else {
            return name.to_string();
        };
        let Ok(i) = i.parse::<usize>() else {
            return name.to_string();
        };
        // ldm numbers the decoder's up blocks from the lowest resolution's end.
        let b = if kind == "up" {
            n_blocks.saturating_sub(1 + i)
        } else {
            i
        };
        if let Some(r) = r.strip_prefix("resnets.") {
            format!("{kind}.{b}.block.{}", resnet(r))
        } else if let Some(leaf) = r.strip_prefix("upsamplers.0.conv.") {
            format!("up.{b}.upsample.conv.{leaf}")
        } else if let Some(leaf) = r.strip_prefix("downsamplers.0.conv.") {
            format!("down.{b}.downsample.conv.{leaf}")
        } else {
            return name.to_string();
        }
    } else {
        rest.to_string() // conv_in, conv_out
    };
    format!("{part}.{mapped}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: Source) -> String {
        match s {
            Source::Key(k) | Source::Squeezed(k) | Source::Transposed(k) => k,
            other => panic!("unexpected source {other:?}"),
        }
    }

    #[test]
    fn open_clip_splits_fused_qkv_into_row_blocks_of_the_width() {
        let n = "text_model.encoder.layers.7.self_attn.v_proj.bias";
        assert_eq!(
            open_clip(n, 1280),
            Source::Rows {
                key: "conditioner.embedders.1.model.transformer.resblocks.7.attn.in_proj_bias".into(),
                start: 2560,
                len: 1280
            }
        );
        assert_eq!(
            key(open_clip("text_model.encoder.layers.7.mlp.fc2.weight", 1280)),
            "conditioner.embedders.1.model.transformer.resblocks.7.mlp.c_proj.weight"
        );
        assert_eq!(
            open_clip("text_projection.weight", 1280),
            Source::Transposed("conditioner.embedders.1.model.text_projection".into())
        );
    }

    #[test]
    fn vae_up_blocks_are_numbered_in_reverse_and_attention_projections_are_squeezed_convs() {
        assert_eq!(
            key(vae("decoder.up_blocks.0.resnets.2.conv1.weight", 4)),
            "first_stage_model.decoder.up.3.block.2.conv1.weight"
        );
        assert_eq!(
            key(vae("decoder.up_blocks.2.resnets.0.conv_shortcut.bias", 4)),
            "first_stage_model.decoder.up.1.block.0.nin_shortcut.bias"
        );
        assert_eq!(
            key(vae("decoder.up_blocks.1.upsamplers.0.conv.weight", 4)),
            "first_stage_model.decoder.up.2.upsample.conv.weight"
        );
        assert_eq!(
            key(vae("encoder.down_blocks.1.downsamplers.0.conv.weight", 4)),
            "first_stage_model.encoder.down.1.downsample.conv.weight"
        );
        assert_eq!(
            vae("decoder.mid_block.attentions.0.to_out.0.weight", 4),
            Source::Squeezed("first_stage_model.decoder.mid.attn_1.proj_out.weight".into())
        );
        assert_eq!(
            vae("decoder.mid_block.attentions.0.to_q.bias", 4),
            Source::Key("first_stage_model.decoder.mid.attn_1.q.bias".into())
        );
        assert_eq!(
            key(vae("decoder.mid_block.resnets.1.norm2.weight", 4)),
            "first_stage_model.decoder.mid.block_2.norm2.weight"
        );
        assert_eq!(
            key(vae("decoder.conv_norm_out.bias", 4)),
            "first_stage_model.decoder.norm_out.bias"
        );
        assert_eq!(
            key(vae("post_quant_conv.weight", 4)),
            "first_stage_model.post_quant_conv.weight"
        );
    }
}
