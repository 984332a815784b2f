//! Test-local model descriptors (published config.json shapes), so the memory
//! and cost tests do not depend on which descriptors the catalog holds yet.

use inferlab_models::{HardwareSpec, ModelConfig};

fn llama(
    h: u64,
    i: u64,
    layers: u64,
    heads: u64,
    kv: u64,
    vocab: u64,
    max_pos: u64,
) -> ModelConfig {
    ModelConfig {
        model_type: "llama".into(),
        hidden_size: h,
        intermediate_size: i,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: Some(kv),
        head_dim: None,
        vocab_size: vocab,
        max_position_embeddings: max_pos,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: false,
        sliding_window: None,
        num_local_experts: None,
        num_experts_per_tok: None,
        hidden_act: "silu".into(),
        attention_bias: None,
        parallel_attn: None,
        norm_type: None,
        torch_dtype: None,
        bos_token_id: None,
        eos_token_id: None,
    }
}

/// meta-llama/Llama-2-7b-hf config.json.
pub fn llama2_7b() -> ModelConfig {
    llama(4096, 11008, 32, 32, 32, 32000, 4096)
}
/// meta-llama/Meta-Llama-3-8B config.json.
pub fn llama3_8b() -> ModelConfig {
    llama(4096, 14336, 32, 32, 8, 128256, 8192)
}
/// meta-llama/Meta-Llama-3-70B config.json.
pub fn llama3_70b() -> ModelConfig {
    llama(8192, 28672, 80, 64, 8, 128256, 8192)
}
/// meta-llama/Llama-3.1-405B config.json.
pub fn llama31_405b() -> ModelConfig {
    llama(16384, 53248, 126, 128, 8, 128256, 131072)
}
/// mistralai/Mixtral-8x7B-v0.1 config.json.
pub fn mixtral_8x7b() -> ModelConfig {
    let mut m = llama(4096, 14336, 32, 32, 8, 32000, 32768);
    m.model_type = "mixtral".into();
    m.num_local_experts = Some(8);
    m.num_experts_per_tok = Some(2);
    m
}
/// tiiuae/falcon-7b (multi-query: one KV head of 64; 71 heads).
pub fn falcon_7b() -> ModelConfig {
    let mut m = llama(4544, 18176, 32, 71, 1, 65024, 2048);
    m.model_type = "falcon".into();
    m.hidden_act = "gelu".into();
    m.parallel_attn = Some(true);
    m.norm_type = Some("layer".into());
    m
}

pub fn gpu(name: &str) -> HardwareSpec {
    inferlab_models::catalog::gpu(name).expect("catalog GPU")
}
