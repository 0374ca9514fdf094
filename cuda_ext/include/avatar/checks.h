// Input checks for torch bindings (C++ only: never include from a .cu file).
// Validate at the door, trust inside: every public op checks device, dtype, shape
// and contiguity and says what it expected.
#pragma once

#include <ATen/ATen.h>

#define AVATAR_CHECK_CONTIGUOUS(x) \
  TORCH_CHECK((x).is_contiguous(), #x " must be contiguous (call .contiguous() first)")
#define AVATAR_CHECK_DTYPE(x, dtype)                                                    \
  TORCH_CHECK((x).scalar_type() == (dtype), #x " must have dtype ", (dtype), ", got ", \
              (x).scalar_type())
#define AVATAR_CHECK_FLOAT_CONTIGUOUS(x) \
  AVATAR_CHECK_DTYPE(x, at::kFloat);     \
  AVATAR_CHECK_CONTIGUOUS(x)
#define AVATAR_CHECK_DIM(x, d) \
  TORCH_CHECK((x).dim() == (d), #x " must have ", (d), " dimensions, got shape ", (x).sizes())
#define AVATAR_CHECK_SAME_DEVICE(x, y) \
  TORCH_CHECK((x).device() == (y).device(), #x " and " #y " must be on the same device")
