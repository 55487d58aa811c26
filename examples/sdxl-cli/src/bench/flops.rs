//! Analytic FLOP counts, computed from the configs the same way `torch.utils.flop_counter
//! .FlopCounterMode` counts a diffusers / transformers forward (what `torch_baseline.py`
//! reports): only convolutions, matmuls (linear layers) and attention are counted, at 2 FLOP
//! per multiply-add; biases, norms, activations, softmax and elementwise ops are not.

use sdxl_core::text::clip::ClipTextConfig;
use sdxl_core::unet::config::TransformerSpec;
use sdxl_core::unet::UNetConfig;
use sdxl_core::vae::VaeConfig;

/// FLOPs of one forward, by kind of operation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flops {
    /// Convolutions (`aten.convolution`).
    pub conv: u64,
    /// Linear layers (`aten.mm` / `aten.addmm`).
    pub linear: u64,
    /// The two matmuls of each attention (`scaled_dot_product_attention` / `aten.bmm`).
    pub attn: u64,
}

impl Flops {
    /// All counted FLOPs.
    pub fn total(&self) -> u64 {
        self.conv + self.linear + self.attn
    }

    /// The total in GFLOP.
    pub fn gflop(&self) -> f64 {
        self.total() as f64 / 1e9
    }

    /// `self` counted `n` times.
    pub fn times(self, n: u64) -> Self {
        Self {
            conv: self.conv * n,
            linear: self.linear * n,
            attn: self.attn * n,
        }
    }

    /// The sum of both counts.
    pub fn plus(self, o: Self) -> Self {
        Self {
            conv: self.conv + o.conv,
            linear: self.linear + o.linear,
            attn: self.attn + o.attn,
        }
    }

    /// One `[m, k] × [k, n]` matmul.
    pub fn matmul(m: usize, k: usize, n: usize) -> Self {
        let mut f = Self::default();
        f.add_linear(m, k, n);
        f
    }

    /// One `k`×`k` convolution producing `[b, cout, h, w]` from `cin` channels.
    pub fn conv2d(b: usize, hw: (usize, usize), cin: usize, cout: usize, k: usize) -> Self {
        let mut f = Self::default();
        f.add_conv(b, hw, cin, cout, k);
        f
    }

    /// A `k`×`k` convolution producing `[b, cout, h, w]` from `cin` channels.
    fn add_conv(&mut self, b: usize, (h, w): (usize, usize), cin: usize, cout: usize, k: usize) {
        self.conv += 2 * (b * h * w * cin * cout * k * k) as u64;
    }

    /// A linear layer `fan_in → fan_out` over `rows` rows.
    fn add_linear(&mut self, rows: usize, fan_in: usize, fan_out: usize) {
        self.linear += 2 * (rows * fan_in * fan_out) as u64;
    }

    /// Attention of `q_len` queries over `kv_len` keys, all heads together `width` wide:
    /// `Q Kᵀ` and `P V`.
    fn add_attention(&mut self, b: usize, q_len: usize, kv_len: usize, width: usize) {
        self.attn += 4 * (b * q_len * kv_len * width) as u64;
    }

    /// diffusers' `ResnetBlock2D` at `hw` (two 3×3 convolutions, the 1×1 shortcut when the
    /// channels change, and `time_emb_proj` when there is a timestep embedding of width
    /// `temb`).
    fn add_resnet(&mut self, b: usize, hw: (usize, usize), cin: usize, cout: usize, temb: usize) {
        self.add_conv(b, hw, cin, cout, 3);
        if temb > 0 {
            self.add_linear(b, temb, cout);
        }
        self.add_conv(b, hw, cout, cout, 3);
        if cin != cout {
            self.add_conv(b, hw, cin, cout, 1);
        }
    }

    /// A `Transformer2DModel` with linear projections over `tokens` positions, conditioned on
    /// `context` text tokens.
    fn add_transformer(&mut self, b: usize, tokens: usize, t: &TransformerSpec, context: usize) {
        let c = t.channels;
        let rows = b * tokens;
        self.add_linear(rows, c, c); // proj_in
        for _ in 0..t.layers {
            // attn1: to_q, to_k, to_v, to_out.0 and self-attention.
            (0..4).for_each(|_| self.add_linear(rows, c, c));
            self.add_attention(b, tokens, tokens, c);
            // attn2: to_q and to_out.0 on the image, to_k / to_v on the text.
            (0..2).for_each(|_| self.add_linear(rows, c, c));
            (0..2).for_each(|_| self.add_linear(b * context, t.cross_attention_dim, c));
            self.add_attention(b, tokens, context, c);
            // ff: GEGLU projection to 2 × 4c, then 4c → c.
            self.add_linear(rows, c, 8 * c);
            self.add_linear(rows, 4 * c, c);
        }
        self.add_linear(rows, c, c); // proj_out
    }

    /// The VAE's single-head mid-block attention over `hw`.
    fn add_vae_attention(&mut self, hw: (usize, usize), c: usize) {
        let tokens = hw.0 * hw.1;
        (0..4).for_each(|_| self.add_linear(tokens, c, c));
        self.add_attention(1, tokens, tokens, c);
    }

    /// The VAE mid block: resnet, attention (when configured), resnet.
    fn add_vae_mid(&mut self, cfg: &VaeConfig, hw: (usize, usize), c: usize) {
        self.add_resnet(1, hw, c, c, 0);
        if cfg.mid_block_add_attention {
            self.add_vae_attention(hw, c);
        }
        self.add_resnet(1, hw, c, c, 0);
    }
}

/// `UNet2DConditionModel.forward` on `[batch, in_channels, h, w]` with `context` text tokens.
///
/// # Errors
/// The config's own errors (unsupported layouts, no `text_time` embedding).
pub fn unet_forward(
    cfg: &UNetConfig,
    batch: usize,
    (h, w): (usize, usize),
    context: usize,
) -> Result<Flops, String> {
    let layout = cfg.layout().map_err(|e| e.to_string())?;
    let (_, add_in) = cfg.text_time_dims().map_err(|e| e.to_string())?;
    let c0 = cfg.block_out_channels.first().copied().unwrap_or(0);
    let temb = cfg.time_embed_dim();
    let b = batch;
    let mut f = Flops::default();
    f.add_linear(b, c0, temb); // time_embedding.linear_1 (on time_proj's c0 features)
    f.add_linear(b, temb, temb);
    f.add_linear(b, add_in, temb); // add_embedding
    f.add_linear(b, temb, temb);
    let mut hw = (h, w);
    f.add_conv(b, hw, cfg.in_channels, c0, cfg.conv_in_kernel);
    for spec in &layout.down {
        for j in 0..spec.num_layers {
            let cin = if j == 0 {
                spec.in_channels
            } else {
                spec.out_channels
            };
            f.add_resnet(b, hw, cin, spec.out_channels, temb);
            if let Some(t) = spec.transformers.as_ref().and_then(|t| t.get(j)) {
                f.add_transformer(b, hw.0 * hw.1, t, context);
            }
        }
        if spec.add_downsample {
            let pad = 2 * cfg.downsample_padding;
            hw = ((hw.0 + pad - 3) / 2 + 1, (hw.1 + pad - 3) / 2 + 1);
            f.add_conv(b, hw, spec.out_channels, spec.out_channels, 3);
        }
    }
    let mid = layout.mid;
    f.add_resnet(b, hw, mid.channels, mid.channels, temb);
    f.add_transformer(b, hw.0 * hw.1, &mid, context);
    f.add_resnet(b, hw, mid.channels, mid.channels, temb);
    for spec in &layout.up {
        for j in 0..spec.num_layers {
            let skip = if j + 1 == spec.num_layers {
                spec.in_channels
            } else {
                spec.out_channels
            };
            let cin = if j == 0 {
                spec.prev_output_channels
            } else {
                spec.out_channels
            };
            f.add_resnet(b, hw, cin + skip, spec.out_channels, temb);
            if let Some(t) = spec.transformers.as_ref().and_then(|t| t.get(j)) {
                f.add_transformer(b, hw.0 * hw.1, t, context);
            }
        }
        if spec.add_upsample {
            hw = (2 * hw.0, 2 * hw.1);
            f.add_conv(b, hw, spec.out_channels, spec.out_channels, 3);
        }
    }
    f.add_conv(b, hw, c0, cfg.out_channels, cfg.conv_out_kernel);
    Ok(f)
}

/// `AutoencoderKL.decode` of latents `[1, latent_channels, h, w]` (with `post_quant_conv`).
pub fn vae_decode(cfg: &VaeConfig, (h, w): (usize, usize)) -> Flops {
    let ch = &cfg.block_out_channels;
    let top = ch.last().copied().unwrap_or(0);
    let lat = cfg.latent_channels;
    let mut f = Flops::default();
    let mut hw = (h, w);
    if cfg.use_post_quant_conv {
        f.add_conv(1, hw, lat, lat, 1);
    }
    f.add_conv(1, hw, lat, top, 3);
    f.add_vae_mid(cfg, hw, top);
    let mut prev = top;
    for (i, &out) in ch.iter().rev().enumerate() {
        for j in 0..=cfg.layers_per_block {
            f.add_resnet(1, hw, if j == 0 { prev } else { out }, out, 0);
        }
        if i + 1 < ch.len() {
            hw = (2 * hw.0, 2 * hw.1);
            f.add_conv(1, hw, out, out, 3);
        }
        prev = out;
    }
    f.add_conv(1, hw, ch.first().copied().unwrap_or(0), cfg.out_channels, 3);
    f
}

/// `AutoencoderKL.encode` of images `[1, in_channels, h, w]` (with `quant_conv`).
pub fn vae_encode(cfg: &VaeConfig, (h, w): (usize, usize)) -> Flops {
    let ch = &cfg.block_out_channels;
    let moments = 2 * cfg.latent_channels;
    let mut f = Flops::default();
    let mut hw = (h, w);
    let mut prev = ch.first().copied().unwrap_or(0);
    f.add_conv(1, hw, cfg.in_channels, prev, 3);
    for (i, &out) in ch.iter().enumerate() {
        for j in 0..cfg.layers_per_block {
            f.add_resnet(1, hw, if j == 0 { prev } else { out }, out, 0);
        }
        if i + 1 < ch.len() {
            // Downsample2D(padding=0) pads right and bottom by one, then a stride-2 3×3 conv.
            hw = ((hw.0 - 2) / 2 + 1, (hw.1 - 2) / 2 + 1);
            f.add_conv(1, hw, out, out, 3);
        }
        prev = out;
    }
    f.add_vae_mid(cfg, hw, prev);
    f.add_conv(1, hw, prev, moments, 3);
    if cfg.use_quant_conv {
        f.add_conv(1, hw, moments, moments, 1);
    }
    f
}

/// A CLIP text encoder on `[batch, tokens]` ids (plus `text_projection` on the pooled rows when
/// `with_projection`).
pub fn clip_forward(
    cfg: &ClipTextConfig,
    batch: usize,
    tokens: usize,
    with_projection: bool,
) -> Flops {
    let mut f = clip_layers(cfg, batch, tokens, cfg.num_hidden_layers);
    if with_projection {
        f.add_linear(batch, cfg.hidden_size, cfg.projection_dim);
    }
    f
}

/// What `ClipTextModel::prompt_embeddings` computes: every layer but the last on all tokens;
/// with a projection, the last layer's keys and values on all tokens and the rest of it, then
/// the projection, on one pooling position per batch entry.
pub fn clip_prompt(
    cfg: &ClipTextConfig,
    batch: usize,
    tokens: usize,
    with_projection: bool,
) -> Flops {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let mut f = clip_layers(cfg, batch, tokens, cfg.num_hidden_layers.saturating_sub(1));
    if with_projection {
        (0..2).for_each(|_| f.add_linear(batch * tokens, h, h));
        (0..2).for_each(|_| f.add_linear(batch, h, h));
        f.add_attention(batch, 1, tokens, h);
        f.add_linear(batch, h, i);
        f.add_linear(batch, i, h);
        f.add_linear(batch, h, cfg.projection_dim);
    }
    f
}

/// `layers` CLIP encoder layers on `[batch, tokens]`.
fn clip_layers(cfg: &ClipTextConfig, batch: usize, tokens: usize, layers: usize) -> Flops {
    let (h, rows) = (cfg.hidden_size, batch * tokens);
    let mut f = Flops::default();
    for _ in 0..layers {
        (0..4).for_each(|_| f.add_linear(rows, h, h));
        f.add_attention(batch, tokens, tokens, h);
        f.add_linear(rows, h, cfg.intermediate_size);
        f.add_linear(rows, cfg.intermediate_size, h);
    }
    f
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    //! Expected values: `torch_baseline.py --flops-only` (torch 2.15 `FlopCounterMode` on the
    //! real SDXL configs, `shared/bench/results/flops.jsonl`), in GFLOP rounded to 0.01.
    use super::*;

    fn base() -> UNetConfig {
        serde_json::from_str(
            r#"{"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                "block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20],
                "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048,
                "use_linear_projection": true, "addition_embed_type": "text_time",
                "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816}"#,
        )
        .unwrap()
    }

    fn refiner() -> UNetConfig {
        serde_json::from_str(
            r#"{"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                     "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                   "UpBlock2D"],
                "block_out_channels": [384, 768, 1536, 1536], "attention_head_dim": [6, 12, 24, 24],
                "transformer_layers_per_block": 4, "cross_attention_dim": 1280,
                "use_linear_projection": true, "addition_embed_type": "text_time",
                "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2560}"#,
        )
        .unwrap()
    }

    fn vae() -> VaeConfig {
        serde_json::from_str(
            r#"{"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2}"#,
        )
        .unwrap()
    }

    fn close(f: Flops, gflop: f64) {
        assert!(
            (f.gflop() - gflop).abs() < 0.006,
            "{} vs {gflop}",
            f.gflop()
        );
    }

    #[test]
    fn unet_matches_torch_flop_counter() {
        for (side, g) in [(32, 855.57), (64, 3177.56), (128, 13522.47)] {
            close(unet_forward(&base(), 2, (side, side), 77).unwrap(), g);
        }
        for (side, g) in [(32, 813.45), (64, 3238.56), (128, 14572.02)] {
            close(unet_forward(&refiner(), 2, (side, side), 77).unwrap(), g);
        }
        // README split at 256 px: conv 202.9, linear 642.8, attention 9.9.
        let f = unet_forward(&base(), 2, (32, 32), 77).unwrap();
        assert_eq!(
            [f.conv, f.linear, f.attn].map(|v| (v as f64 / 1e8).round() / 10.0),
            [202.9, 642.8, 9.9]
        );
    }

    #[test]
    fn vae_matches_torch_flop_counter() {
        for (side, dec, enc) in [
            (32, 622.19, 272.72),
            (64, 2514.52, 1116.66),
            (128, 10470.39, 4878.95),
        ] {
            close(vae_decode(&vae(), (side, side)), dec);
            close(vae_encode(&vae(), (8 * side, 8 * side)), enc);
        }
    }

    #[test]
    fn text_encoders_match_torch_flop_counter() {
        close(
            clip_forward(&ClipTextConfig::sdxl_text_encoder(), 2, 77, false),
            26.6,
        );
        close(
            clip_forward(&ClipTextConfig::sdxl_text_encoder_2(), 2, 77, true),
            195.73,
        );
    }

    #[test]
    fn prompt_embeddings_skip_the_unread_part_of_the_last_layer() {
        // CLIP-L: 11 of 12 layers. bigG: 31 of 32 layers plus, of the last, the keys and
        // values of 154 tokens and the rest for 2 rows.
        let l = ClipTextConfig::sdxl_text_encoder();
        let l_11 = ClipTextConfig {
            num_hidden_layers: 11,
            ..l.clone()
        };
        assert_eq!(
            clip_prompt(&l, 2, 77, false),
            clip_forward(&l_11, 2, 77, false)
        );
        let g = ClipTextConfig::sdxl_text_encoder_2();
        let g_31 = ClipTextConfig {
            num_hidden_layers: 31,
            ..g.clone()
        };
        let (h, i, p) = (1280u64, 5120u64, 1280u64);
        let last = 2 * 154 * h * h * 2 // k, v on every token
            + 2 * 2 * h * h * 2 // q, out on 2 rows
            + 4 * 2 * 77 * h // attention of 2 queries
            + 2 * 2 * h * i * 2 // the MLP on 2 rows
            + 2 * 2 * h * p; // the projection
        assert_eq!(
            clip_prompt(&g, 2, 77, true).total(),
            clip_forward(&g_31, 2, 77, false).total() + last
        );
    }
}
