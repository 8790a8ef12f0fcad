// Argument checks shared by the forward ops of every family. They run once
// per step, in the forward op (or the family's check op), before any kernel:
// shapes first, then dtypes and devices, then index ranges, so that a
// transposed weight is reported as a shape error. Backward ops only assert
// the sizes of what their forward produced.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>

namespace fusedloss::checks {

using at::Tensor;

// input [N, D] with D > 0 and a classifier weight [C, D] with C > 0 (+ an
// optional bias [C]), all of one floating dtype on one CPU or CUDA device.
inline void classifier(const char* fn, const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias) {
  TORCH_CHECK_VALUE(input.dim() == 2, fn, ": input must be [N, D] after flattening, got shape ", input.sizes());
  TORCH_CHECK_VALUE(input.size(1) > 0, fn, ": input has no features (D=0)");
  TORCH_CHECK_VALUE(weight.dim() == 2, fn, ": weight must be 2-D [num_classes, D], got shape ", weight.sizes());
  TORCH_CHECK_VALUE(input.size(1) == weight.size(1), fn, ": input has D=", input.size(1),
                    " features but weight has D=", weight.size(1), " (weight must be [num_classes, D], not transposed)");
  TORCH_CHECK_VALUE(weight.size(0) > 0, fn, ": weight has no rows (num_classes=0)");
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), fn, ": bias must be [num_classes]=[",
                      weight.size(0), "], got ", bias->sizes());
  }
  TORCH_CHECK_TYPE(at::isFloatingType(input.scalar_type()), fn,
                   ": input must be float32, float64, bfloat16 or float16, got ", input.scalar_type());
  TORCH_CHECK_TYPE(weight.scalar_type() == input.scalar_type(), fn, ": weight dtype ", weight.scalar_type(),
                   " differs from input dtype ", input.scalar_type());
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == input.scalar_type(), fn, ": bias dtype ", bias->scalar_type(),
                     " differs from input dtype ", input.scalar_type());
  }
  TORCH_CHECK_VALUE(input.device().is_cpu() || input.device().is_cuda(), fn, ": unsupported device ", input.device());
  TORCH_CHECK_VALUE(weight.device() == input.device(), fn, ": weight is on ", weight.device(), " but input is on ",
                    input.device());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->device() == input.device(), fn, ": bias is on ", bias->device(), " but input is on ",
                      input.device());
  }
}

// An int64 index tensor on `like`'s device.
inline void index_tensor(const char* fn, const char* name, const Tensor& index, const Tensor& like) {
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, fn, ": ", name, " must be int64, got ", index.scalar_type());
  TORCH_CHECK_VALUE(index.device() == like.device(), fn, ": ", name, " is on ", index.device(), " but input is on ",
                    like.device());
}

// Every entry of `index` in [0, upper) or equal to `ignore`. A host scan on the
// CPU; on CUDA it would be a host sync, so the Python layer checks there (and
// skips it while tracing or capturing a graph).
inline void index_range(const char* fn, const char* name, const Tensor& index, int64_t upper,
                        std::optional<int64_t> ignore = std::nullopt) {
  if (!index.is_cpu()) return;
  const Tensor flat = index.contiguous();  // kept alive while it is scanned
  const int64_t* values = flat.data_ptr<int64_t>();
  for (int64_t i = 0; i < flat.numel(); ++i) {
    const int64_t v = values[i];
    TORCH_CHECK_INDEX((ignore.has_value() && v == *ignore) || (v >= 0 && v < upper), fn, ": ", name, "[", i,
                      "]=", v, " is outside [0, ", upper, ")",
                      ignore.has_value() ? " and is not ignore_index" : "");
  }
}

// A finite option in [low, high].
inline void in_range(const char* fn, const char* name, double value, double low, double high) {
  TORCH_CHECK_VALUE(std::isfinite(value) && value >= low && value <= high, fn, ": ", name, " must be in [", low,
                    ", ", high, "], got ", value);
}

// A finite option >= 0.
inline void non_negative(const char* fn, const char* name, double value) {
  TORCH_CHECK_VALUE(std::isfinite(value) && value >= 0.0, fn, ": ", name, " must be finite and >= 0, got ", value);
}

// The optional normalizer of a single pass: one element on the input's device.
inline void normalizer(const char* fn, const std::optional<Tensor>& normalizer, const Tensor& input) {
  if (!normalizer.has_value()) return;
  TORCH_CHECK_VALUE(normalizer->numel() == 1 && normalizer->device() == input.device(), fn,
                    ": normalizer must be a 0-dim tensor on the input's device");
}

}  // namespace fusedloss::checks
