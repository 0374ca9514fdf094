// The Python module `avatar._C`. Ops register themselves with
// TORCH_LIBRARY_FRAGMENT(avatar, ...) in their own translation units and are
// called as torch.ops.avatar.<name>; importing this module loads them.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "avatar native ops (see avatar/ops for the documented Python API)";
#ifdef AVATAR_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
