// Python bindings of the CUDA kernels (module duallora_kernels._C when prebuilt, or the JIT
// module that duallora_kernels/ops/cuda.py builds on first use). The Python side validates
// arguments and owns autograd; these functions only check the layout contract and launch.
#include <optional>
#include <vector>

#include <torch/extension.h>

namespace duallora {
at::Tensor task_scores(const at::Tensor& z, const at::Tensor& bases, double eps);
std::vector<at::Tensor> dual_lora_forward(const at::Tensor& x2, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                                          const std::optional<at::Tensor>& a, const std::optional<at::Tensor>& bt,
                                          const std::optional<at::Tensor>& gate, int64_t r_orth, int64_t r_blk,
                                          double orth_scale, double res_scale, bool store_t);
std::vector<at::Tensor> dual_lora_backward(const at::Tensor& dy2, const at::Tensor& w, const std::optional<at::Tensor>& a,
                                           const std::optional<at::Tensor>& bt, const std::optional<at::Tensor>& gate,
                                           const std::optional<at::Tensor>& t, const std::optional<at::Tensor>& x2,
                                           int64_t r_orth, int64_t r_blk, double orth_scale, double res_scale,
                                           int64_t da_orth_end, int64_t da_res_start, int64_t db_orth_end,
                                           int64_t db_res_start, bool need_dx, bool need_dbias);
}  // namespace duallora

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "duallora_kernels CUDA kernels (see duallora_kernels/ops/cuda.py)";
  m.def("task_scores", &duallora::task_scores, "||U_t^T z||^2 / max(||z||^2, eps), all tasks in one launch");
  m.def("dual_lora_forward", &duallora::dual_lora_forward, "fused DualLoRA forward: returns [Y, T]");
  m.def("dual_lora_backward", &duallora::dual_lora_backward, "fused DualLoRA backward: returns [dX, dA, dB^T, dbias]");
}
