// bf16 autocast on CUDA. tch only toggles autocast (whose CUDA dtype defaults to fp16);
// this sets the dtype too. Built by build.rs against the venv's libtorch headers.
#include <ATen/autocast_mode.h>

extern "C" bool dtta_autocast_bf16_enter() {
  bool previous = at::autocast::is_autocast_enabled(at::kCUDA);
  at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
  at::autocast::set_autocast_enabled(at::kCUDA, true);
  at::autocast::increment_nesting();
  return previous;
}

extern "C" void dtta_autocast_exit(bool previous) {
  if (at::autocast::decrement_nesting() == 0) {
    at::autocast::clear_cache();
  }
  at::autocast::set_autocast_enabled(at::kCUDA, previous);
}

// TF32 tensor cores for fp32 matmuls and convolutions on CUDA (Ampere and later), and
// cuDNN's autotuner (the shapes repeat for every image). No effect on the CPU.
#include <ATen/Context.h>

extern "C" void dtta_cuda_fast_fp32(bool tf32) {
  at::globalContext().setAllowTF32CuBLAS(tf32);
  at::globalContext().setAllowTF32CuDNN(tf32);
  at::globalContext().setBenchmarkCuDNN(true);
}
