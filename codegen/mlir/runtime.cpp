// The one C runtime function the code MLIR's sparsifier emits for sparsec's graphs calls and the
// torch-mlir wheel does not ship (it comes from MLIR's libmlir_c_runner_utils): a strided memref copy.
#include <cstdint>
#include <cstring>

namespace {

// MLIR's ranked memref descriptor: two pointers, an offset, then `rank` sizes and `rank` strides.
struct RankedDescriptor {
  char* allocated;
  char* aligned;
  int64_t offset;
  int64_t shape_and_strides[1];  // sizes[rank] followed by strides[rank]
};

struct UnrankedDescriptor {
  int64_t rank;
  RankedDescriptor* descriptor;
};

}  // namespace

extern "C" void memrefCopy(int64_t element_size, UnrankedDescriptor* source, UnrankedDescriptor* target) {
  const int64_t rank = source->rank;
  const RankedDescriptor* src = source->descriptor;
  const RankedDescriptor* dst = target->descriptor;
  const int64_t* sizes = src->shape_and_strides;
  const int64_t* src_strides = src->shape_and_strides + rank;
  const int64_t* dst_strides = dst->shape_and_strides + rank;
  int64_t total = 1;
  for (int64_t d = 0; d < rank; ++d) total *= sizes[d];
  if (total == 0) return;
  int64_t index[64] = {0};  // the odometer over every element; MLIR ranks stay far below 64
  int64_t src_offset = src->offset, dst_offset = dst->offset;
  for (int64_t n = 0; n < total; ++n) {
    std::memcpy(dst->aligned + dst_offset * element_size, src->aligned + src_offset * element_size, element_size);
    for (int64_t d = rank - 1; d >= 0; --d) {  // advance the last dimension, carrying into earlier ones
      src_offset += src_strides[d];
      dst_offset += dst_strides[d];
      if (++index[d] < sizes[d]) break;
      src_offset -= src_strides[d] * sizes[d];
      dst_offset -= dst_strides[d] * sizes[d];
      index[d] = 0;
    }
  }
}
