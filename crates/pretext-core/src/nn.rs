//! Trainable layers on the fast ops, with PyTorch parameter names and
//! PyTorch's default initialisation.
//!
//! Activations of convolutional layers are channels-last, `(n, h, w, c)`.
//! Weights keep PyTorch's layouts (`conv.weight` is `(out, in, kh, kw)`), so a
//! state dict saved from these layers loads into the matching torch module.

use crate::ops::{self, NormStats};
use candle_core::{DType, Tensor, Var};
use candle_nn::{Init, VarBuilder};

/// Builders for trainable parameters and for buffers (BatchNorm statistics)
/// that share one name prefix but live in different stores.
#[derive(Clone)]
pub struct Builders {
    /// Trainable parameters (seen by the optimizer).
    pub params: VarBuilder<'static>,
    /// Buffers (saved with the model, never optimised).
    pub buffers: VarBuilder<'static>,
}

impl Builders {
    /// Both builders one level down: `pp("layer1")`.
    pub fn pp(&self, name: impl ToString) -> Self {
        let n = name.to_string();
        Self {
            params: self.params.pp(&n),
            buffers: self.buffers.pp(&n),
        }
    }
}

fn uniform(bound: f64) -> Init {
    Init::Uniform { lo: -bound, up: bound }
}

/// A fully connected layer, `y = x · weightᵀ + bias` over the last dimension
/// (`torch.nn.Linear`'s names, layout and initialisation), on the fused
/// [`ops::linear`] node when it has a bias.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// A layer from its weight `(out, in)` and optional bias `(out)`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// The weight `(out, in)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias `(out)`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `(…, in)` → `(…, out)`.
    ///
    /// # Errors
    /// Shapes that do not fit.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.bias {
            Some(b) => ops::linear(x, &self.weight, b),
            None => x.broadcast_matmul(&self.weight.t()?),
        }
    }
}

impl candle_core::Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Linear::forward(self, x)
    }
}

/// A fully connected layer initialised like `torch.nn.Linear`
/// (weight and bias uniform in ±1/√in). Names: `weight` `(out, in)`, `bias`.
///
/// # Errors
/// The builder failed.
pub fn linear(din: usize, dout: usize, bias: bool, vb: VarBuilder) -> candle_core::Result<Linear> {
    let bound = 1.0 / (din as f64).sqrt();
    let w = vb.get_with_hints((dout, din), "weight", uniform(bound))?;
    let b = if bias {
        Some(vb.get_with_hints(dout, "bias", uniform(bound))?)
    } else {
        None
    };
    Ok(Linear::new(w, b))
}

/// A fully connected layer with the given initialisation of its weight
/// `(out, in)` and bias `(out)` (BERT's: weight `N(0, 0.02²)`, bias 0).
///
/// # Errors
/// The builder failed.
pub fn linear_init(din: usize, dout: usize, weight: Init, bias: Init, vb: &VarBuilder) -> candle_core::Result<Linear> {
    let w = vb.get_with_hints((dout, din), "weight", weight)?;
    let b = vb.get_with_hints(dout, "bias", bias)?;
    Ok(Linear::new(w, Some(b)))
}

/// Layer normalisation over the last dimension (`torch.nn.LayerNorm`'s
/// names `weight`, `bias` and initialisation 1, 0), on the fused
/// [`ops::layer_norm`] node.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    /// A layer over `h` features with `eps` added to the variance.
    ///
    /// # Errors
    /// The builder failed.
    pub fn new(h: usize, eps: f64, vb: &VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(h, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(h, "bias", Init::Const(0.0))?,
            eps: eps as f32,
        })
    }

    /// `(…, h)` → `(…, h)`.
    ///
    /// # Errors
    /// The last dimension is not `h`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// A 2-D convolution over NHWC activations (`torch.nn.Conv2d` names and init).
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    pad: usize,
}

impl Conv2d {
    /// A `k × k` convolution from `cin` to `cout` channels.
    ///
    /// # Errors
    /// The builder failed.
    pub fn new(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let bound = 1.0 / ((cin * k * k) as f64).sqrt();
        let weight = vb.get_with_hints((cout, cin, k, k), "weight", uniform(bound))?;
        let bias = if bias {
            Some(vb.get_with_hints(cout, "bias", uniform(bound))?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            stride,
            pad,
        })
    }

    /// `(n, h, w, cin)` → `(n, oh, ow, cout)`.
    ///
    /// # Errors
    /// Shapes that do not fit.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.bias {
            Some(b) => ops::conv::conv2d_bias_nhwc(x, &self.weight, b, self.stride, self.pad, false),
            None => ops::conv2d_nhwc(x, &self.weight, self.stride, self.pad),
        }
    }

    /// `relu(forward(x))`, the bias and ReLU as one node.
    ///
    /// # Errors
    /// Shapes that do not fit.
    pub fn forward_relu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.bias {
            Some(b) => ops::conv::conv2d_bias_nhwc(x, &self.weight, b, self.stride, self.pad, true),
            None => ops::relu(&ops::conv2d_nhwc(x, &self.weight, self.stride, self.pad)?),
        }
    }

    /// The weight `(out, in, kh, kw)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

/// A transposed 2-D convolution over NHWC activations (`torch.nn.ConvTranspose2d`
/// names, layout `(in, out, kh, kw)` and init), e.g. for VAE decoders.
#[derive(Debug, Clone)]
pub struct ConvTranspose2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    pad: usize,
    out_pad: usize,
}

impl ConvTranspose2d {
    /// A `k × k` transposed convolution from `cin` to `cout` channels.
    ///
    /// # Errors
    /// The builder failed.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
        out_pad: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        // PyTorch computes fan-in from dim 1 of the weight: cout * k * k.
        let bound = 1.0 / ((cout * k * k) as f64).sqrt();
        let weight = vb.get_with_hints((cin, cout, k, k), "weight", uniform(bound))?;
        let bias = if bias {
            Some(vb.get_with_hints(cout, "bias", uniform(bound))?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            stride,
            pad,
            out_pad,
        })
    }

    /// `(n, h, w, cin)` → `(n, (h-1)·stride - 2·pad + k + out_pad, …, cout)`.
    ///
    /// # Errors
    /// Shapes that do not fit.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_with(x, false)
    }

    /// The transposed convolution with its bias (then ReLU with `relu`).
    fn forward_with(&self, x: &Tensor, relu: bool) -> candle_core::Result<Tensor> {
        let geometry = (self.stride, self.pad, self.out_pad);
        match &self.bias {
            Some(b) => ops::conv::conv_transpose2d_bias_nhwc(x, &self.weight, b, geometry, relu),
            None => {
                let y = ops::conv_transpose2d_nhwc(x, &self.weight, self.stride, self.pad, self.out_pad)?;
                if relu {
                    ops::relu(&y)
                } else {
                    Ok(y)
                }
            }
        }
    }

    /// `relu(forward(x))`, the bias and ReLU as one node.
    ///
    /// # Errors
    /// Shapes that do not fit.
    pub fn forward_relu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_with(x, true)
    }
}

/// Batch normalisation over the last dimension (`BatchNorm2d` on NHWC maps,
/// `BatchNorm1d` on `(n, c)`), with running statistics as in PyTorch
/// (momentum 0.1, unbiased running variance). Names: `weight`, `bias`,
/// `running_mean`, `running_var`, `num_batches_tracked`.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    num_batches_tracked: Var,
    eps: f64,
    momentum: f64,
}

fn buffer(vb: &VarBuilder, shape: usize, name: &str, init: f64, dtype: DType) -> candle_core::Result<Var> {
    let t = vb.get_with_hints_dtype(shape, name, Init::Const(init), dtype)?;
    // Builders backed by a VarMap hand out the variable's own tensor.
    Var::from_tensor(&t)
}

impl BatchNorm {
    /// Batch norm over `c` channels (eps 1e-5, momentum 0.1).
    ///
    /// # Errors
    /// The builders failed.
    pub fn new(c: usize, b: &Builders) -> candle_core::Result<Self> {
        Self::with_affine(c, true, b)
    }

    /// Batch norm over `c` channels; without `affine` (PyTorch's
    /// `affine=False`) there is no `weight` or `bias`: the output is the
    /// normalised input itself, and only the running statistics are stored.
    ///
    /// # Errors
    /// The builders failed.
    pub fn with_affine(c: usize, affine: bool, b: &Builders) -> candle_core::Result<Self> {
        let (weight, bias) = if affine {
            (
                b.params.get_with_hints(c, "weight", Init::Const(1.0))?,
                b.params.get_with_hints(c, "bias", Init::Const(0.0))?,
            )
        } else {
            let dev = b.params.device();
            (
                Tensor::ones(c, b.params.dtype(), dev)?,
                Tensor::zeros(c, b.params.dtype(), dev)?,
            )
        };
        let running_mean = buffer(&b.buffers, c, "running_mean", 0.0, DType::F32)?;
        let running_var = buffer(&b.buffers, c, "running_var", 1.0, DType::F32)?;
        let nbt = b
            .buffers
            .get_with_hints_dtype((), "num_batches_tracked", Init::Const(0.0), DType::I64)?;
        let num_batches_tracked = Var::from_tensor(&nbt)?;
        Ok(Self {
            weight,
            bias,
            running_mean,
            running_var,
            num_batches_tracked,
            eps: 1e-5,
            momentum: 0.1,
        })
    }

    /// The scale `(c)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The shift `(c)`.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// The running mean and variance, as used in evaluation mode.
    ///
    /// # Errors
    /// A tensor could not be read.
    pub fn running_stats(&self) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
        Ok((
            self.running_mean.as_tensor().to_vec1::<f32>()?,
            self.running_var.as_tensor().to_vec1::<f32>()?,
        ))
    }

    /// Folds one batch's statistics (mean, biased variance over `count`
    /// values per channel) into the running ones, as PyTorch does.
    ///
    /// # Errors
    /// A tensor operation failed.
    pub fn update_running(&self, mean: Vec<f32>, var: Vec<f32>, count: usize) -> candle_core::Result<()> {
        let n = count as f64;
        let unbias = if n > 1.0 { n / (n - 1.0) } else { 1.0 };
        let m = self.momentum;
        let dev = self.running_mean.device();
        let mean = Tensor::new(mean, dev)?;
        let var = (Tensor::new(var, dev)? * unbias)?;
        let rm = ((self.running_mean.as_tensor() * (1.0 - m))? + (mean * m)?)?;
        let rv = ((self.running_var.as_tensor() * (1.0 - m))? + (var * m)?)?;
        self.running_mean.set(&rm)?;
        self.running_var.set(&rv)?;
        self.num_batches_tracked
            .set(&(self.num_batches_tracked.as_tensor() + 1.0)?)
    }

    /// Normalises `x` (channels last), with batch statistics when `train` (and
    /// updates the running statistics), else with the running ones; applies
    /// ReLU after when `relu`.
    ///
    /// # Errors
    /// Shapes that do not fit.
    pub fn forward_t(&self, x: &Tensor, train: bool, relu: bool) -> candle_core::Result<Tensor> {
        if train {
            let (y, stats) = ops::batch_norm(x, &self.weight, &self.bias, NormStats::Batch, self.eps, relu)?;
            if let Some((mean, var)) = stats {
                // Values per channel over the whole batch (all ranks' in a data-parallel step).
                let n = crate::dist::norm_rows(x.elem_count() / mean.len().max(1)) as f64;
                let unbias = if n > 1.0 { n / (n - 1.0) } else { 1.0 };
                let m = self.momentum;
                let dev = self.running_mean.device();
                let mean = Tensor::new(mean, dev)?;
                let var = (Tensor::new(var, dev)? * unbias)?;
                let rm = ((self.running_mean.as_tensor() * (1.0 - m))? + (mean * m)?)?;
                let rv = ((self.running_var.as_tensor() * (1.0 - m))? + (var * m)?)?;
                self.running_mean.set(&rm)?;
                self.running_var.set(&rv)?;
                self.num_batches_tracked
                    .set(&(self.num_batches_tracked.as_tensor() + 1.0)?)?;
            }
            Ok(y)
        } else {
            let stats = NormStats::Fixed(
                self.running_mean.as_tensor().to_vec1::<f32>()?,
                self.running_var.as_tensor().to_vec1::<f32>()?,
            );
            Ok(ops::batch_norm(x, &self.weight, &self.bias, stats, self.eps, relu)?.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::{named_tensors, SeededVarMap};
    use candle_core::Device;
    use candle_nn::VarMap;

    #[test]
    fn names_and_running_statistics_follow_pytorch() -> candle_core::Result<()> {
        let params = SeededVarMap::from_seed(0, crate::seed::INIT);
        let buffers = VarMap::new();
        let b = Builders {
            params: params.var_builder(DType::F32, &Device::Cpu),
            buffers: VarBuilder::from_varmap(&buffers, DType::F32, &Device::Cpu),
        };
        let conv = Conv2d::new(2, 3, 3, 1, 1, false, b.params.pp("conv1"))?;
        let bn = BatchNorm::new(3, &b.pp("bn1"))?;
        let names: Vec<String> = named_tensors(params.var_map()).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["bn1.bias", "bn1.weight", "conv1.weight"]);
        let bufs: Vec<String> = named_tensors(&buffers).into_iter().map(|(n, _)| n).collect();
        assert_eq!(bufs, ["bn1.num_batches_tracked", "bn1.running_mean", "bn1.running_var"]);
        // conv weights are uniform in ±1/sqrt(fan_in)
        let w = conv.weight().flatten_all()?.to_vec1::<f32>()?;
        assert!(w.iter().all(|v| v.abs() <= 1.0 / 18f32.sqrt()));

        // running stats: x with per-channel mean (1, 2, 3), values spread so var is known
        let x = Tensor::new(&[[1f32, 2.0, 3.0], [3.0, 4.0, 5.0]], &Device::Cpu)?; // mean (2,3,4), biased var 1, unbiased 2
        let y = bn.forward_t(&x, true, false)?;
        let bufs = named_tensors(&buffers);
        assert_eq!(bufs[0].1.to_scalar::<i64>()?, 1);
        let rm = bufs[1].1.to_vec1::<f32>()?;
        let rv = bufs[2].1.to_vec1::<f32>()?;
        for j in 0..3 {
            assert!((rm[j] - 0.1 * (j as f32 + 2.0)).abs() < 1e-6);
            assert!((rv[j] - (0.9 + 0.1 * 2.0)).abs() < 1e-6);
        }
        // train output normalised to -1, +1 (within eps)
        let yv = y.to_vec2::<f32>()?;
        assert!((yv[0][0] + 1.0).abs() < 1e-4 && (yv[1][2] - 1.0).abs() < 1e-4);
        // eval uses running stats
        let ye = bn.forward_t(&x, false, true)?.to_vec2::<f32>()?;
        let want = (1.0 - 0.2) / (1.1f32 + 1e-5).sqrt();
        assert!((ye[0][0] - want).abs() < 1e-5, "{} vs {want}", ye[0][0]);
        Ok(())
    }

    #[test]
    fn batch_norm_without_affine_has_only_buffers_and_normalises() -> candle_core::Result<()> {
        let params = SeededVarMap::from_seed(0, crate::seed::INIT);
        let buffers = VarMap::new();
        let b = Builders {
            params: params.var_builder(DType::F32, &Device::Cpu),
            buffers: VarBuilder::from_varmap(&buffers, DType::F32, &Device::Cpu),
        };
        let bn = BatchNorm::with_affine(2, false, &b.pp("bn"))?;
        assert!(named_tensors(params.var_map()).is_empty(), "no trainable parameters");
        let bufs: Vec<String> = named_tensors(&buffers).into_iter().map(|(n, _)| n).collect();
        assert_eq!(bufs, ["bn.num_batches_tracked", "bn.running_mean", "bn.running_var"]);
        let x = Tensor::new(&[[1f32, 10.0], [3.0, 30.0]], &Device::Cpu)?;
        let y = bn.forward_t(&x, true, false)?.to_vec2::<f32>()?;
        for (got, want) in y.iter().flatten().zip([-1f32, -1.0, 1.0, 1.0]) {
            assert!((got - want).abs() < 1e-3, "{y:?}");
        }
        Ok(())
    }
}
