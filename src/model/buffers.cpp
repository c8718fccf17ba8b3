// The buffers of a TorchScript module (BatchNorm running statistics), which tch does not
// expose. TENT's train-mode passes write them, so a failed batch must put them back
// (Method::recover). Built by build.rs against the venv's libtorch headers.
#include <torch/script.h>

// Writes up to `capacity` new tensor handles (owned by the caller, as tch's own
// `torch::Tensor*`) that alias the module's buffers, recursively, in the module's
// order; returns how many buffers there are, or -1 on an exception.
extern "C" int64_t dtta_module_buffers(torch::jit::script::Module* module, torch::Tensor** out, int64_t capacity) {
  try {
    int64_t n = 0;
    for (const auto& buffer : module->named_buffers(/*recurse=*/true)) {
      if (n < capacity) {
        out[n] = new torch::Tensor(buffer.value);
      }
      n++;
    }
    return n;
  } catch (...) {
    return -1;
  }
}
