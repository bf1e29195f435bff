#!/usr/bin/env python3
"""Writes a random-weight FLUX.1-dev pipeline folder in diffusers layout (what FluxPipeline's
save_pretrained writes), for timing the whole pipeline without the real checkpoint.

  build_pipeline.py OUT_DIR [--size full|tiny] [--device cuda|cpu]

full: the real FLUX.1-dev shapes: transformer 11.9 B (19 double + 38 single blocks, 3072 wide),
T5-XXL encoder (24 layers, d_model 4096, d_ff 10240, 64 heads, vocab 32128), CLIP-L text model
(12 layers, 768 wide, vocab 49408), the 16-channel VAE, the dev scheduler; all bf16, about 34 GB.
tiny: the same layout with tiny widths/depths, for checking the scripts on a CPU.
Weights: each library's own random init (seeded), built directly on `--device` in bf16.
Tokenizers: the small offline ones of tests/fixtures/gen_flux_goldens.py (no hub access); their
ids stay below the real vocab sizes, so the embedding tables have the real shapes.
"""
import argparse
import json
import os
import shutil
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# tests/fixtures of this checkout, or of the repo root (the device machine runs a copy from .gpu/)
sys.path[:0] = [os.path.join(HERE, "..", "..", "..", "tests", "fixtures"), os.path.join(os.getcwd(), "tests", "fixtures")]
import gen_flux_goldens as G  # noqa: E402  (build_tokenizers)

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel  # noqa: E402

SIZES = {
    "full": dict(
        clip=dict(vocab_size=49408, num_hidden_layers=12, hidden_size=768, intermediate_size=3072,
                  num_attention_heads=12, projection_dim=768),
        t5=dict(vocab_size=32128, num_layers=24, d_model=4096, d_kv=64, d_ff=10240, num_heads=64),
        tr=dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56)),
        vae=dict(block_out_channels=(128, 256, 512, 512), norm_num_groups=32, layers_per_block=2),
    ),
    "tiny": dict(
        clip=dict(vocab_size=1000, num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                  num_attention_heads=4, projection_dim=32),
        t5=dict(vocab_size=1000, num_layers=2, d_model=32, d_kv=8, d_ff=64, num_heads=4),
        tr=dict(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)),
        vae=dict(block_out_channels=(8, 8, 16, 16), norm_num_groups=4, layers_per_block=1),
    ),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--size", default="full", choices=SIZES)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)  # gen_flux_goldens sets 2 on import
    torch.set_grad_enabled(False)
    S = SIZES[a.size]
    if os.path.exists(a.out):
        shutil.rmtree(a.out)
    os.makedirs(a.out)
    t0 = time.time()
    clip_tok, t5_tok = G.build_tokenizers(a.out)
    assert len(clip_tok) <= S["clip"]["vocab_size"] and len(t5_tok) <= S["t5"]["vocab_size"]
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(a.device):
        torch.manual_seed(1)
        # bos/pad/eos ids as in the goldens (eos_token_id 2: CLIP pools at argmax(input_ids), the
        # end-of-text token being the highest id of the small vocab, as in the real one).
        clip = CLIPTextModel(CLIPTextConfig(max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0,
                                            pad_token_id=1, eos_token_id=2, **S["clip"])).eval()
        torch.manual_seed(2)
        t5 = T5EncoderModel(T5Config(feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                                     relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
                                     tie_word_embeddings=False, **S["t5"])).eval()
        torch.manual_seed(3)
        tr = FluxTransformer2DModel(patch_size=1, in_channels=64, guidance_embeds=True, **S["tr"]).eval()
        torch.manual_seed(5)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, down_block_types=["DownEncoderBlock2D"] * 4,
                            up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.3611, shift_factor=0.1159,
                            use_quant_conv=False, use_post_quant_conv=False, sample_size=1024, **S["vae"]).eval()
    torch.set_default_dtype(torch.float32)
    for m in (clip, t5, tr, vae):
        m.to(torch.bfloat16)
    t_init = time.time() - t0
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                            max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=sched, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                        tokenizer_2=t5_tok, transformer=tr)
    t1 = time.time()
    pipe.save_pretrained(a.out)
    t_save = time.time() - t1
    # FLUX.1-dev's tokenizer/ has vocab.json + merges.txt and no tokenizer.json (as the goldens).
    tj = os.path.join(a.out, "tokenizer", "tokenizer.json")
    if os.path.exists(tj):
        os.remove(tj)
    for f in ("vocab.json", "merges.txt"):
        assert os.path.exists(os.path.join(a.out, "tokenizer", f)), f
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(a.out) for f in fs)
    info = dict(size=a.size, params=dict(transformer=n(tr), t5=n(t5), clip=n(clip), vae=n(vae)),
                bytes_on_disk=size, init_s=round(t_init, 1), save_s=round(t_save, 1),
                clip_vocab_used=len(clip_tok), t5_vocab_used=len(t5_tok))
    print(json.dumps(info))


if __name__ == "__main__":
    main()
