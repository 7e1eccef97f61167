//! The one adapter between our CPU kernels and candle's custom-op traits.
//!
//! candle's `CustomOp1/2/3` hand `cpu_fwd` each operand as a storage and a
//! layout and take gradients back as tuples of different sizes. Every op here
//! needs the same of them: the operands' contiguous f32 values and dims in, an
//! f32 buffer and its shape out, gradients as a list. [`FusedOp`] is that
//! shape, written once per op; [`apply`] runs it as a graph node with its
//! backward pass and [`apply_no_grad`] as a node without one (the kernels of
//! backward passes).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};

/// One operand of a kernel: its contiguous f32 values and its dims.
#[derive(Debug, Clone, Copy)]
pub struct Operand<'a> {
    /// The values, row-major.
    pub data: &'a [f32],
    /// The dims.
    pub dims: &'a [usize],
}

impl Operand<'_> {
    /// The size of the last dimension (1 for a scalar).
    pub fn last_dim(&self) -> usize {
        self.dims.last().copied().unwrap_or(1)
    }
}

/// A CPU f32 kernel over one to three operands, with its backward pass.
pub trait FusedOp: Send + Sync + 'static {
    /// The node's name in candle's graph and in errors.
    fn name(&self) -> &'static str;

    /// The output values and shape from the operands.
    ///
    /// # Errors
    /// Operands that do not fit the op.
    fn forward(&self, inputs: &[Operand<'_>]) -> candle_core::Result<(Vec<f32>, Shape)>;

    /// The gradient of each input (in order; `None` for none) from the inputs,
    /// the output and the output's gradient.
    ///
    /// # Errors
    /// The op has no backward pass (the default), or a tensor operation failed.
    fn backward(&self, inputs: &[&Tensor], output: &Tensor, grad: &Tensor) -> candle_core::Result<Vec<Option<Tensor>>> {
        let _ = (inputs, output, grad);
        Err(candle_core::Error::BackwardNotSupported { op: self.name() })
    }
}

/// A [`FusedOp`] as a candle custom op.
struct Node<T>(T);

fn operand<'a>(op: &str, i: usize, s: &'a CpuStorage, l: &'a Layout) -> candle_core::Result<Operand<'a>> {
    let CpuStorage::F32(v) = s else {
        bail!("{op}: operand {i} must be f32, got {:?}", s.dtype())
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{op}: operand {i} must be contiguous")
    };
    Ok(Operand {
        data: &v[a..b],
        dims: l.dims(),
    })
}

impl<T: FusedOp> Node<T> {
    fn run(&self, inputs: &[Operand<'_>]) -> candle_core::Result<(CpuStorage, Shape)> {
        let (y, shape) = self.0.forward(inputs)?;
        if y.len() != shape.elem_count() {
            bail!("{}: produced {} values for shape {shape:?}", self.0.name(), y.len())
        }
        Ok((CpuStorage::F32(y), shape))
    }

    fn grads<const N: usize>(
        &self,
        inputs: [&Tensor; N],
        output: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; N]> {
        let g = self.0.backward(&inputs, output, grad)?;
        let n = g.len();
        match <[Option<Tensor>; N]>::try_from(g) {
            Ok(g) => Ok(g),
            Err(_) => bail!("{}: {n} gradients for {N} inputs", self.0.name()),
        }
    }
}

impl<T: FusedOp> CustomOp1 for Node<T> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run(&[operand(self.0.name(), 0, s, l)?])
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let [g] = self.grads([x], y, dy)?;
        Ok(g)
    }
}

impl<T: FusedOp> CustomOp2 for Node<T> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.0.name();
        self.run(&[operand(name, 0, s1, l1)?, operand(name, 1, s2, l2)?])
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let [ga, gb] = self.grads([a, b], y, dy)?;
        Ok((ga, gb))
    }
}

impl<T: FusedOp> CustomOp3 for Node<T> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.0.name();
        self.run(&[
            operand(name, 0, s1, l1)?,
            operand(name, 1, s2, l2)?,
            operand(name, 2, s3, l3)?,
        ])
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [ga, gb, gc] = self.grads([a, b, c], y, dy)?;
        Ok((ga, gb, gc))
    }
}

/// `op` over `inputs` (one to three, contiguous f32 CPU tensors) as a graph
/// node whose gradient is [`FusedOp::backward`].
///
/// # Errors
/// No or more than three inputs, or the op's own errors.
pub fn apply<T: FusedOp>(inputs: &[&Tensor], op: T) -> candle_core::Result<Tensor> {
    match inputs {
        [a] => a.apply_op1(Node(op)),
        [a, b] => a.apply_op2(b, Node(op)),
        [a, b, c] => a.apply_op3(b, c, Node(op)),
        _ => bail!("{}: takes one to three inputs, got {}", op.name(), inputs.len()),
    }
}

/// `op` over `inputs` as a node that records no gradient (the kernels that
/// backward passes call).
///
/// # Errors
/// As [`apply`].
pub fn apply_no_grad<T: FusedOp>(inputs: &[&Tensor], op: T) -> candle_core::Result<Tensor> {
    let node = Node(op);
    match inputs {
        [a] => a.apply_op1_no_bwd(&node),
        [a, b] => a.apply_op2_no_bwd(b, &node),
        [a, b, c] => a.apply_op3_no_bwd(b, c, &node),
        _ => bail!("{}: takes one to three inputs, got {}", node.0.name(), inputs.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// `a · b` elementwise, with its gradient.
    struct Product;

    impl FusedOp for Product {
        fn name(&self) -> &'static str {
            "test-product"
        }

        fn forward(&self, x: &[Operand<'_>]) -> candle_core::Result<(Vec<f32>, Shape)> {
            let y = x[0].data.iter().zip(x[1].data).map(|(a, b)| a * b).collect();
            Ok((y, Shape::from(x[0].dims.to_vec())))
        }

        fn backward(&self, x: &[&Tensor], _y: &Tensor, dy: &Tensor) -> candle_core::Result<Vec<Option<Tensor>>> {
            Ok(vec![Some((dy * x[1])?), Some((dy * x[0])?)])
        }
    }

    struct WrongLength;

    impl FusedOp for WrongLength {
        fn name(&self) -> &'static str {
            "test-wrong-length"
        }

        fn forward(&self, _x: &[Operand<'_>]) -> candle_core::Result<(Vec<f32>, Shape)> {
            Ok((vec![0.0; 3], Shape::from(2)))
        }
    }

    #[test]
    fn a_fused_op_runs_forward_and_backward_as_a_node() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let a = Var::new(&[1f32, 2.0, 3.0], &dev)?;
        let b = Var::new(&[4f32, 5.0, 6.0], &dev)?;
        let y = apply(&[a.as_tensor(), b.as_tensor()], Product)?;
        assert_eq!(y.to_vec1::<f32>()?, vec![4.0, 10.0, 18.0]);
        let g = y.sum_all()?.backward()?;
        assert_eq!(g.get(a.as_tensor()).expect("da").to_vec1::<f32>()?, vec![4.0, 5.0, 6.0]);
        assert_eq!(g.get(b.as_tensor()).expect("db").to_vec1::<f32>()?, vec![1.0, 2.0, 3.0]);
        // no gradient recorded
        let z = apply_no_grad(&[a.as_tensor(), b.as_tensor()], Product)?;
        assert!(!z.track_op());
        Ok(())
    }

    #[test]
    fn bad_operands_and_outputs_are_errors_that_name_the_op() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &dev)?;
        let e = apply(&[&a.t()?, &a], Product).expect_err("strided operand");
        assert!(
            e.to_string().contains("test-product: operand 0 must be contiguous"),
            "{e}"
        );
        let e = apply(&[&a.to_dtype(candle_core::DType::F64)?, &a], Product).expect_err("f64");
        assert!(e.to_string().contains("must be f32"), "{e}");
        let e = apply(&[&a], WrongLength).expect_err("length");
        assert!(e.to_string().contains("test-wrong-length: produced 3 values"), "{e}");
        let e = apply(&[&a, &a, &a, &a], Product).expect_err("four inputs");
        assert!(e.to_string().contains("one to three"), "{e}");
        let x = Var::new(&[1f32, 2.0], &dev)?;
        let y = apply(&[x.as_tensor()], Identity)?;
        assert!(y.sum_all()?.backward().is_err(), "no backward pass");
        Ok(())
    }

    struct Identity;

    impl FusedOp for Identity {
        fn name(&self) -> &'static str {
            "test-no-backward"
        }

        fn forward(&self, x: &[Operand<'_>]) -> candle_core::Result<(Vec<f32>, Shape)> {
            Ok((x[0].data.to_vec(), Shape::from(x[0].dims.to_vec())))
        }
    }
}
