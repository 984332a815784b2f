//! One linear layer through any method: the driver `inferlab quantize layer`
//! and the model-level loop share. It checks the inputs once, runs the method,
//! and measures the output error `‖X·Wᵀ − X·Ŵᵀ‖²` of RTN with the same settings
//! ("before") and of the method ("after").

use ndarray::{Array1, Array2, ArrayView2};

use super::awq::{awq_layer, AwqConfig, ClipSearch, ScaleSearch};
use super::gptq::{gptq, ActOrder, Damping, GptqConfig, GroupParamTiming, Hessian};
use super::{check_finite, output_error, rtn, Grouping, QuantSpec, QuantizedLinear};
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Rtn,
    Gptq,
    Awq,
}

impl Method {
    pub fn name(&self) -> &'static str {
        match self {
            Method::Rtn => "rtn",
            Method::Gptq => "gptq",
            Method::Awq => "awq",
        }
    }
}

/// Settings for every method (each reads the fields it uses).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerOptions {
    pub method: Method,
    pub spec: QuantSpec,
    pub act_order: ActOrder,
    pub timing: GroupParamTiming,
    pub damping: Damping,
    pub awq_scales: ScaleSearch,
    pub awq_clip: ClipSearch,
    /// How a whole-model run computes its calibration activations and Hessians.
    pub calibration: Calibration,
}

/// Arithmetic of the whole-model calibration pass (`quant::model`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Calibration {
    /// The oracle's forward (run.c's f32 order, bit-exact) and f64 Hessians
    /// accumulated as the reference code does (running mean per sample).
    #[default]
    Exact,
    /// As a bf16 model calibrates (AutoGPTQ runs fp16 models on a GPU): every
    /// linear and the attention of the calibration forward with inputs rounded
    /// to bf16 and f32 sums, and `H = (2/n)·Σ XᵀX` from bf16-rounded inputs
    /// with f32 sums per 2048 tokens and f64 across them
    /// ([`crate::model::bf16`], Intel AMX tiles when present). The GPTQ/AWQ
    /// solve itself stays f64; the model written is the same kind of model.
    Bf16,
}

impl LayerOptions {
    pub fn new(method: Method, spec: QuantSpec) -> Self {
        LayerOptions {
            method,
            spec,
            act_order: ActOrder::Off,
            timing: GroupParamTiming::Dynamic,
            damping: Damping::default(),
            awq_scales: ScaleSearch::ActivationOnly,
            awq_clip: ClipSearch::On,
            calibration: Calibration::Exact,
        }
    }

    /// GPTQ's settings from these options.
    pub fn gptq_config(&self) -> GptqConfig {
        let mut cfg = GptqConfig::new(self.spec);
        cfg.act_order = self.act_order;
        cfg.timing = self.timing;
        cfg.damping = self.damping;
        cfg
    }
}

/// A quantized layer and how well it does.
#[derive(Debug, Clone)]
pub struct LayerResult {
    pub quantized: QuantizedLinear,
    /// AWQ's per-input-channel scales (inputs are divided by them); `None` otherwise.
    pub input_scales: Option<Array1<f64>>,
    /// The weight the layer applies to its original inputs, `[out, in]`.
    pub effective: Array2<f64>,
    /// RTN with the same bits, grouping and scheme.
    pub error_rtn: f64,
    /// The method's.
    pub error: f64,
    /// `‖X·Wᵀ‖²`, to make the errors relative.
    pub output_norm: f64,
    pub dead_columns: usize,
    pub percdamp: Option<f64>,
    pub awq_alpha: Option<f64>,
}

/// Quantize `w` `[out, in]` calibrated on `x` `[tokens, in]`.
pub fn quantize_layer(
    w: ArrayView2<f64>,
    x: ArrayView2<f64>,
    opt: &LayerOptions,
) -> Result<LayerResult> {
    let (_, n) = w.dim();
    if x.ncols() != n {
        return Err(Error::shape(
            "calibration activations",
            format!("[tokens, {n}] (the weight's input dimension)"),
            format!("{:?}", x.dim()),
        ));
    }
    if x.nrows() == 0 {
        return Err(Error::invalid(
            "calibration activations",
            "there are no tokens",
        ));
    }
    check_finite("weight", w)?;
    check_finite("calibration activations", x)?;
    opt.spec.maxq()?;
    opt.spec.grouping.group_len(n)?;
    let rtn_q = rtn::quantize(w, &opt.spec)?;
    let rtn_w = rtn_q.dequantize();
    let error_rtn = output_error(x, w, rtn_w.view());
    let zero = Array2::<f64>::zeros(w.dim());
    let output_norm = output_error(x, w, zero.view());
    let mut res = LayerResult {
        quantized: rtn_q,
        input_scales: None,
        effective: rtn_w,
        error_rtn,
        error: error_rtn,
        output_norm,
        dead_columns: 0,
        percdamp: None,
        awq_alpha: None,
    };
    match opt.method {
        Method::Rtn => {}
        Method::Gptq => {
            let mut h = Hessian::new(n);
            h.add_batch(x, x.nrows())?;
            let out = gptq(w, &h, &opt.gptq_config())?;
            res.effective = out.quantized.dequantize();
            res.quantized = out.quantized;
            res.dead_columns = out.dead_columns;
            res.percdamp = Some(out.percdamp);
            res.error = output_error(x, w, res.effective.view());
        }
        Method::Awq => {
            let g = match opt.spec.grouping {
                Grouping::Group(g) => g,
                Grouping::PerChannel => n,
                Grouping::PerTensor => {
                    return Err(Error::invalid(
                        "group_size",
                        "AWQ quantizes per group or per channel, not per tensor",
                    ))
                }
            };
            let mut cfg = AwqConfig::new(opt.spec.bits, g);
            cfg.scheme = opt.spec.scheme;
            cfg.scale_search = opt.awq_scales;
            cfg.clip = opt.awq_clip;
            let out = awq_layer(w, x, &cfg)?;
            res.effective = out.effective_weight();
            res.error = output_error(x, w, res.effective.view());
            res.quantized = out.quantized;
            res.awq_alpha = Some(out.alpha);
            res.input_scales = Some(out.input_scales);
        }
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::gptq::tests::{correlated, weights};
    use crate::quant::Scheme;

    /// One line per bad input: the error names what is wrong.
    #[test]
    fn bad_inputs_are_named() {
        let w = weights(8, 32, 1);
        let x = correlated(40, 32, 2);
        let check = |w: &Array2<f64>,
                     x: &Array2<f64>,
                     method: Method,
                     bits: u32,
                     grouping: Grouping,
                     needle: &str| {
            let opt = LayerOptions::new(method, QuantSpec::new(bits, grouping, Scheme::Asymmetric));
            let e = quantize_layer(w.view(), x.view(), &opt)
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{method:?} {bits} {grouping:?}: {e}");
        };
        let mut wnan = w.clone();
        wnan[[2, 3]] = f64::NAN;
        let mut xinf = x.clone();
        xinf[[5, 1]] = f64::NEG_INFINITY;
        let x_short = correlated(40, 16, 2);
        let zeros = Array2::<f64>::zeros((40, 32));
        let none = Array2::<f64>::zeros((0, 32));
        for m in [Method::Rtn, Method::Gptq, Method::Awq] {
            check(&w, &x_short, m, 4, Grouping::Group(8), "[tokens, 32]");
            check(&w, &x, m, 4, Grouping::Group(12), "does not divide");
            check(&w, &x, m, 1, Grouping::Group(8), "bits");
            check(&w, &x, m, 9, Grouping::Group(8), "bits");
            check(
                &wnan,
                &x,
                m,
                4,
                Grouping::Group(8),
                "weight contains a non-finite value at [2, 3]",
            );
            check(
                &w,
                &xinf,
                m,
                4,
                Grouping::Group(8),
                "calibration activations contains a non-finite value at [5, 1]",
            );
            check(&w, &none, m, 4, Grouping::Group(8), "no tokens");
        }
        check(&w, &zeros, Method::Gptq, 4, Grouping::Group(8), "all zero");
        check(&w, &x, Method::Awq, 4, Grouping::PerTensor, "per tensor");
    }

    #[test]
    fn gptq_and_awq_beat_rtn_at_3_bits() {
        let w = weights(32, 128, 3);
        let x = correlated(512, 128, 4);
        for m in [Method::Gptq, Method::Awq] {
            let r = quantize_layer(
                w.view(),
                x.view(),
                &LayerOptions::new(
                    m,
                    QuantSpec::new(3, Grouping::Group(32), Scheme::Asymmetric),
                ),
            )
            .unwrap();
            assert!(
                r.error < r.error_rtn,
                "{m:?}: {} vs {}",
                r.error,
                r.error_rtn
            );
            assert!(r.error_rtn < r.output_norm);
        }
    }
}
