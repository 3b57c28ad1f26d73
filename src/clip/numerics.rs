//! The number types of the backbone's computations.

use candle_core::DType;

/// The type PyTorch's autocast computes exponentials, softmax, norms and losses in: f32 at least
/// (f64 stays f64). Half types keep 5 (f16) or 8 (bf16) bits of exponent or mantissa too few for
/// them: `e^x` leaves f16's range above x = 11.09, a sum of squares above 65504.
pub fn wide(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}
