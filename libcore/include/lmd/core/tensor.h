// A host tensor: dtype, shape and bytes, either owned or a read-only view into memory kept alive by
// an owner (a memory-mapped checkpoint file), so weights are not copied on load.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "lmd/core/dtype.h"

namespace lmd {

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);  // "[4, 64]"
int64_t shape_numel(const Shape& s);

class HostTensor {
 public:
  HostTensor() = default;
  // Owned, zero-filled.
  HostTensor(DType dtype, Shape shape);
  // Read-only view of `data`; `owner` keeps the memory alive.
  static HostTensor view(DType dtype, Shape shape, const void* data, std::shared_ptr<const void> owner);
  static HostTensor from_f32(const std::vector<float>& values, Shape shape, DType dtype = DType::F32);

  bool empty() const { return data_ == nullptr; }
  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  int ndim() const { return static_cast<int>(shape_.size()); }
  int64_t dim(int i) const { return shape_.at(i < 0 ? shape_.size() + i : i); }
  int64_t numel() const { return shape_numel(shape_); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }

  const void* data() const { return data_; }
  bool writable() const { return writable_; }  // owned (not a read-only view)
  void* mutable_data();                        // throws on a read-only view
  template <class T>
  const T* data_as() const {
    return static_cast<const T*>(data_);
  }
  template <class T>
  T* mutable_data_as() {
    return static_cast<T*>(mutable_data());
  }

  // Values converted to fp32 (float types exactly, integer types by value).
  std::vector<float> to_f32() const;
  HostTensor to(DType dtype) const;       // owned copy in another dtype
  HostTensor clone() const;               // owned copy
  HostTensor reshape(Shape shape) const;  // shares storage; numel must match

 private:
  DType dtype_ = DType::F32;
  Shape shape_;
  std::shared_ptr<const void> owner_;
  const void* data_ = nullptr;
  bool writable_ = false;
};

}  // namespace lmd
