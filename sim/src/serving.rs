//! Glue between descriptors and the engine: how many KV blocks a model gets
//! on a GPU. This is a placeholder until `memory::plan_memory` (simcost)
//! lands; callers go through [`kv_plan`] only, so swapping is one line.
//!
//! Placeholder formula (vLLM's shape): `blocks = floor((memory · utilization
//! − weights − activation peak − overhead) / bytes per block)`, weights and
//! KV split evenly over `tp` GPUs; activation peak ≈ `T · (4·hidden + 2·intermediate)`
//! elements for a token budget `T`, and a fixed 1 GiB of runtime overhead.

use inferlab_models::{Dtype, HardwareSpec, ModelConfig};
use serde::Serialize;

use crate::{Error, Result};

#[derive(Debug, Clone, Serialize)]
pub struct ServingOptions {
    /// Activation and KV dtype.
    pub dtype: Dtype,
    /// Weight storage dtype (differs from `dtype` under weight-only quantization).
    pub weight_dtype: Dtype,
    pub tp: u32,
    pub block_size: u32,
    pub gpu_memory_utilization: f64,
    pub max_num_batched_tokens: u32,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct KvPlan {
    pub num_kv_blocks: u32,
    pub block_size: u32,
    /// One block on one GPU.
    pub kv_bytes_per_block: u64,
    pub weight_bytes: u64,
}

pub fn kv_plan(model: &ModelConfig, hw: &HardwareSpec, o: &ServingOptions) -> Result<KvPlan> {
    if !(o.gpu_memory_utilization > 0.0 && o.gpu_memory_utilization <= 1.0) {
        return Err(Error::config(
            "gpu-memory-utilization",
            format!("{} is not in (0, 1]", o.gpu_memory_utilization),
        ));
    }
    if o.tp == 0
        || model.num_kv_heads() % o.tp as u64 != 0 && o.tp as u64 % model.num_kv_heads() != 0
    {
        return Err(Error::config(
            "tp",
            format!("{} does not split {} KV heads", o.tp, model.num_kv_heads()),
        ));
    }
    if o.block_size == 0 {
        return Err(Error::config("block-size", "must be positive"));
    }
    let tp = o.tp as u64;
    let weight_bytes = o.weight_dtype.bytes_for(model.num_params()).div_ceil(tp);
    let act = o.dtype.bytes_for(
        o.max_num_batched_tokens as u64 * (4 * model.hidden_size + 2 * model.intermediate_size)
            / tp,
    );
    let overhead = 1u64 << 30;
    let budget = (hw.memory_bytes as f64 * o.gpu_memory_utilization) as u64;
    let kv_bytes_per_block = (model.kv_bytes_per_token(o.dtype) * o.block_size as u64).div_ceil(tp);
    let fixed = weight_bytes + act + overhead;
    if fixed + kv_bytes_per_block > budget {
        return Err(Error::DoesNotFit {
            what: format!(
                "weights ({weight_bytes} B) + activations ({act} B) + overhead ({overhead} B) + one KV block ({kv_bytes_per_block} B) on {} x{} at utilization {}",
                hw.name, o.tp, o.gpu_memory_utilization
            ),
            needed_bytes: fixed + kv_bytes_per_block,
            available_bytes: budget,
        });
    }
    let blocks = (budget - fixed) / kv_bytes_per_block;
    Ok(KvPlan {
        num_kv_blocks: blocks.min(u32::MAX as u64 - 1) as u32,
        block_size: o.block_size,
        kv_bytes_per_block,
        weight_bytes,
    })
}
