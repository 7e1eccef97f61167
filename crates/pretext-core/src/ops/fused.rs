//! The one adapter between our CPU kernels and candle's custom-op traits.
//!
//! candle's `CustomOp1/2/3` hand `cpu_fwd` each operand as a storage and a
//! layout and take gradients back as tuples of different sizes. Every op here
//! needs the same of them: the operands' contiguous f32 values and dims in, an
//! f32 buffer and its shape out, one gradient per operand. [`FusedOp`] is that
//! shape, with the number of operands in its type (so an op destructures its
//! operands in its signature and cannot return the wrong number of
//! gradients); [`apply`] runs it as a graph node with its backward pass and
//! [`apply_no_grad`] as a node without one (the kernels of backward passes).

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

/// The contiguous f32 values of a tensor, for a backward pass: borrowed from
/// its CPU storage (under the storage's read lock, held while this lives)
/// where the tensor is contiguous f32 on the CPU, copied otherwise. Backward
/// passes read their inputs, outputs and gradients through it rather than
/// copying each with `to_vec1` (a whole activation per operand per step).
pub enum Values<'a> {
    /// A view of the tensor's storage, `start..end`.
    Borrowed(candle_core::StorageRef<'a>, usize, usize),
    /// A copy (another device, dtype or layout).
    Owned(Vec<f32>),
}

impl std::ops::Deref for Values<'_> {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        match self {
            Values::Borrowed(storage, a, b) => match &**storage {
                candle_core::Storage::Cpu(CpuStorage::F32(v)) => &v[*a..*b],
                // `values` borrows only f32 CPU storage
                _ => &[],
            },
            Values::Owned(v) => v,
        }
    }
}

/// A view of `t`'s values where `t` is a contiguous f32 CPU tensor; `None`
/// otherwise (the callers' signal to take a tensor path instead).
pub fn borrowed(t: &Tensor) -> Option<Values<'_>> {
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(CpuStorage::F32(_)), Some((a, b))) => Some(Values::Borrowed(storage, a, b)),
        _ => None,
    }
}

/// The values an in-place op (candle's `InplaceOp1::cpu_fwd`) may write:
/// the contiguous f32 span of `storage` that `layout` covers.
///
/// # Errors
/// Other storage or a strided layout: "`{what}` is not a contiguous f32
/// tensor".
pub(crate) fn in_place_values<'a>(
    storage: &'a mut CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a mut [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(all), Some((a, b))) => Ok(&mut all[a..b]),
        _ => bail!("{what} is not a contiguous f32 tensor"),
    }
}

/// `t`'s values, row-major, borrowed where it can be (see [`Values`]).
///
/// # Errors
/// The copy failed (a dtype that does not convert to f32).
pub fn values(t: &Tensor) -> candle_core::Result<Values<'_>> {
    if let Some(v) = borrowed(t) {
        return Ok(v);
    }
    Ok(Values::Owned(
        t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?,
    ))
}

/// A CPU f32 kernel over `N` operands (one to three), with its backward pass.
pub trait FusedOp<const N: usize>: Send + Sync + 'static {
    /// The node's name in candle's graph and in errors.
    const NAME: &'static str;

    /// The name of this instance ([`Self::NAME`] unless an op has variants).
    fn name(&self) -> &'static str {
        Self::NAME
    }

    /// The output values and shape from the operands.
    ///
    /// # Errors
    /// Operands that do not fit the op.
    fn forward(&self, inputs: [Operand<'_>; N]) -> candle_core::Result<(Vec<f32>, Shape)>;

    /// The gradient of each input (in order; `None` for none) from the inputs,
    /// the output and the output's gradient.
    ///
    /// # Errors
    /// The op has no backward pass (the default), or a tensor operation failed.
    fn backward(
        &self,
        inputs: [&Tensor; N],
        output: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; N]> {
        let _ = (inputs, output, grad);
        Err(candle_core::Error::BackwardNotSupported { op: self.name() })
    }
}

/// A [`FusedOp`] as a candle custom op, with the data-parallel step's
/// collective its forward pass ran under: its backward pass runs under the
/// same, whenever candle calls it.
struct Node<T>(T, Option<crate::dist::StepContext>);

impl<T> Node<T> {
    fn new(op: T) -> Self {
        Self(op, crate::dist::current_step())
    }

    fn backward<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        crate::dist::with_step(self.1.clone(), || f(&self.0))
    }
}

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

/// The storage of `op`'s output, checked against its shape.
fn output(name: &str, (y, shape): (Vec<f32>, Shape)) -> candle_core::Result<(CpuStorage, Shape)> {
    if y.len() != shape.elem_count() {
        bail!("{name}: produced {} values for shape {shape:?}", y.len())
    }
    Ok((CpuStorage::F32(y), shape))
}

impl<T: FusedOp<1>> CustomOp1 for Node<T> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.0.name();
        output(name, self.0.forward([operand(name, 0, s, l)?])?)
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let [g] = self.backward(|op| op.backward([x], y, dy))?;
        Ok(g)
    }
}

impl<T: FusedOp<2>> CustomOp2 for Node<T> {
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
        output(
            name,
            self.0.forward([operand(name, 0, s1, l1)?, operand(name, 1, s2, l2)?])?,
        )
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let [ga, gb] = self.backward(|op| op.backward([a, b], y, dy))?;
        Ok((ga, gb))
    }
}

impl<T: FusedOp<3>> CustomOp3 for Node<T> {
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
        output(
            name,
            self.0.forward([
                operand(name, 0, s1, l1)?,
                operand(name, 1, s2, l2)?,
                operand(name, 2, s3, l3)?,
            ])?,
        )
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [ga, gb, gc] = self.backward(|op| op.backward([a, b, c], y, dy))?;
        Ok((ga, gb, gc))
    }
}

/// The operands of a [`FusedOp`] `T`: an array of one to three tensors, as
/// many as `T` takes.
pub trait Operands<T> {
    /// `op` over these operands as a graph node, recording its gradient when
    /// `grad` is set.
    ///
    /// # Errors
    /// The op's own errors, or an operand that is not a contiguous f32 CPU tensor.
    fn node(self, op: T, grad: bool) -> candle_core::Result<Tensor>;
}

impl<T: FusedOp<1>> Operands<T> for [&Tensor; 1] {
    fn node(self, op: T, grad: bool) -> candle_core::Result<Tensor> {
        let [a] = self;
        if grad {
            a.apply_op1(Node::new(op))
        } else {
            a.apply_op1_no_bwd(&Node::new(op))
        }
    }
}

impl<T: FusedOp<2>> Operands<T> for [&Tensor; 2] {
    fn node(self, op: T, grad: bool) -> candle_core::Result<Tensor> {
        let [a, b] = self;
        if grad {
            a.apply_op2(b, Node::new(op))
        } else {
            a.apply_op2_no_bwd(b, &Node::new(op))
        }
    }
}

impl<T: FusedOp<3>> Operands<T> for [&Tensor; 3] {
    fn node(self, op: T, grad: bool) -> candle_core::Result<Tensor> {
        let [a, b, c] = self;
        if grad {
            a.apply_op3(b, c, Node::new(op))
        } else {
            a.apply_op3_no_bwd(b, c, &Node::new(op))
        }
    }
}

/// `op` over `inputs` (contiguous f32 CPU tensors, as many as the op takes)
/// as a graph node whose gradient is [`FusedOp::backward`].
///
/// # Errors
/// The op's own errors, or an operand that is not a contiguous f32 CPU tensor.
pub fn apply<T>(inputs: impl Operands<T>, op: T) -> candle_core::Result<Tensor> {
    inputs.node(op, true)
}

/// `op` over `inputs` as a node that records no gradient (the kernels that
/// backward passes call).
///
/// # Errors
/// As [`apply`].
pub fn apply_no_grad<T>(inputs: impl Operands<T>, op: T) -> candle_core::Result<Tensor> {
    inputs.node(op, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// `a · b` elementwise, with its gradient.
    struct Product;

    impl FusedOp<2> for Product {
        const NAME: &'static str = "test-product";

        fn forward(&self, [a, b]: [Operand<'_>; 2]) -> candle_core::Result<(Vec<f32>, Shape)> {
            let y = a.data.iter().zip(b.data).map(|(a, b)| a * b).collect();
            Ok((y, Shape::from(a.dims.to_vec())))
        }

        fn backward(&self, [a, b]: [&Tensor; 2], _y: &Tensor, dy: &Tensor) -> candle_core::Result<[Option<Tensor>; 2]> {
            Ok([Some((dy * b)?), Some((dy * a)?)])
        }
    }

    struct WrongLength;

    impl FusedOp<1> for WrongLength {
        const NAME: &'static str = "test-wrong-length";

        fn forward(&self, _: [Operand<'_>; 1]) -> candle_core::Result<(Vec<f32>, Shape)> {
            Ok((vec![0.0; 3], Shape::from(2)))
        }
    }

    #[test]
    fn a_fused_op_runs_forward_and_backward_as_a_node() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let a = Var::new(&[1f32, 2.0, 3.0], &dev)?;
        let b = Var::new(&[4f32, 5.0, 6.0], &dev)?;
        let y = apply([a.as_tensor(), b.as_tensor()], Product)?;
        assert_eq!(y.to_vec1::<f32>()?, vec![4.0, 10.0, 18.0]);
        let g = y.sum_all()?.backward()?;
        assert_eq!(g.get(a.as_tensor()).expect("da").to_vec1::<f32>()?, vec![4.0, 5.0, 6.0]);
        assert_eq!(g.get(b.as_tensor()).expect("db").to_vec1::<f32>()?, vec![1.0, 2.0, 3.0]);
        // no gradient recorded
        let z = apply_no_grad([a.as_tensor(), b.as_tensor()], Product)?;
        assert!(!z.track_op());
        Ok(())
    }

    #[test]
    fn bad_operands_and_outputs_are_errors_that_name_the_op() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &dev)?;
        let e = apply([&a.t()?, &a], Product).expect_err("strided operand");
        assert!(
            e.to_string().contains("test-product: operand 0 must be contiguous"),
            "{e}"
        );
        let e = apply([&a.to_dtype(candle_core::DType::F64)?, &a], Product).expect_err("f64");
        assert!(e.to_string().contains("must be f32"), "{e}");
        let e = apply([&a], WrongLength).expect_err("length");
        assert!(e.to_string().contains("test-wrong-length: produced 3 values"), "{e}");
        let x = Var::new(&[1f32, 2.0], &dev)?;
        let y = apply([x.as_tensor()], Identity)?;
        assert!(y.sum_all()?.backward().is_err(), "no backward pass");
        Ok(())
    }

    struct Identity;

    impl FusedOp<1> for Identity {
        const NAME: &'static str = "test-no-backward";

        fn forward(&self, [x]: [Operand<'_>; 1]) -> candle_core::Result<(Vec<f32>, Shape)> {
            Ok((x.data.to_vec(), Shape::from(x.dims.to_vec())))
        }
    }
}
