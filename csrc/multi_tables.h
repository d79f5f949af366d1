// The multi-adapter layout tables' shapes, checked by the CPU (multi_lora.cpp) and CUDA (multi_lora_cuda.cu) ops
// alike: seg (n_seg x 4) int64, slot (n_slot x 3) int64, one dropout p and one scale per slot (schemas and the rows'
// meaning in multi_lora.cpp). Their numbers are checked against the operands on the host by the Python wrapper.
#pragma once

#include <ATen/ATen.h>

namespace lorafusion {

inline void check_table_shapes(const at::Tensor& seg, const at::Tensor& slot, const at::Tensor& slot_p,
                               const at::Tensor& slot_scale, const char* op) {
  TORCH_CHECK(seg.dim() == 2 && seg.size(1) == 4 && seg.scalar_type() == at::kLong, op,
              ": seg must be an (n_seg x 4) int64 tensor, got ", seg.sizes(), " ", seg.scalar_type());
  TORCH_CHECK(slot.dim() == 2 && slot.size(1) == 3 && slot.scalar_type() == at::kLong, op,
              ": slot must be an (n_slot x 3) int64 tensor, got ", slot.sizes(), " ", slot.scalar_type());
  TORCH_CHECK(slot_p.numel() == slot.size(0) && slot_scale.numel() == slot.size(0), op,
              ": slot_p / slot_scale need one entry per slot (", slot.size(0), "), got ", slot_p.numel(), " and ",
              slot_scale.numel());
}

}  // namespace lorafusion
