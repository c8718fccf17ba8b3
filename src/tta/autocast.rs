//! `tta.precision = "bf16"`: CUDA autocast to bfloat16, weights stay fp32. Also the
//! CUDA fp32 math mode (`runtime.tf32`).
//!
//! Hazard: tch's own `autocast` leaves the CUDA autocast dtype at fp16; this goes
//! through a small C++ shim (autocast.cpp) that sets bf16 explicitly.

use tch::Device;

extern "C" {
    fn dtta_autocast_bf16_enter() -> bool;
    fn dtta_autocast_exit(previous: bool);
    fn dtta_cuda_fast_fp32(tf32: bool);
}

/// On CUDA: TF32 for fp32 matmuls and convolutions when `tf32` (10-bit mantissa
/// products, fp32 accumulation, as PyTorch's `allow_tf32`), and cuDNN autotuning.
/// Process-wide; call before the models run. Nothing happens on other devices.
pub fn configure_cuda_math(device: Device, tf32: bool) {
    if let Device::Cuda(_) = device {
        // SAFETY: sets global flags of ATen's context; no pointers involved.
        unsafe { dtta_cuda_fast_fp32(tf32) };
    }
}

/// bf16 autocast only exists for CUDA devices.
pub fn check_supported(device: Device) -> Result<(), tch::TchError> {
    match device {
        Device::Cuda(_) => Ok(()),
        other => Err(tch::TchError::Kind(format!(
            "tta.precision = \"bf16\" is CUDA autocast, but the device is {other:?}; use precision = \"fp32\""
        ))),
    }
}

/// Runs `f` with bf16 autocast enabled for CUDA ops.
pub fn bf16<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: the shim only flips thread-local autocast state and restores it below.
    let previous = unsafe { dtta_autocast_bf16_enter() };
    let result = f();
    unsafe { dtta_autocast_exit(previous) };
    result
}
