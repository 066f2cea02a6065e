// Checks that hold for every Backend, run on the CPU backend by the CPU tests and on the CUDA backend by
// the GPU tests.
#pragma once
#include <vector>

#include "lmd/engine/backend.h"
#include "test_support.h"

namespace lmd::test {

// download_into: the values of each tensor, in the destination's own buffer when it has the tensor's
// dtype and shape and is writable, in a new one otherwise (a read-only view is replaced, not written).
inline void check_download_into(Backend& be) {
  const std::vector<float> a{1, 2, 3, 4, 5, 6}, b{-1, 0.5f, 8, 9, -10, 11};
  const DeviceTensor ta = be.upload(HostTensor::from_f32(a, {2, 3}), DType::F32);
  const DeviceTensor tb = be.upload(HostTensor::from_f32(b, {2, 3}), DType::F32);
  const DeviceTensor tc = be.upload(HostTensor::from_f32(b, {3, 2}), DType::F32);
  HostTensor dst;
  be.download_into(ta, dst);
  CHECK(dst.shape() == Shape{2, 3});
  CHECK(dst.to_f32() == a);
  const void* buffer = dst.data();
  be.download_into(tb, dst);
  CHECK(dst.data() == buffer);  // reused
  CHECK(dst.to_f32() == b);
  be.download_into(tc, dst);
  CHECK(dst.shape() == Shape{3, 2});
  CHECK(dst.to_f32() == b);
  std::vector<float> outside(6, 7.f);
  HostTensor view = HostTensor::view(DType::F32, {2, 3}, outside.data(), nullptr);
  be.download_into(ta, view);
  CHECK(view.writable());
  CHECK(view.to_f32() == a);
  CHECK(outside == std::vector<float>(6, 7.f));
}

}  // namespace lmd::test
