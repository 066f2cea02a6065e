#include "lmd/core/tensor.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>

#include "lmd/core/error.h"

namespace lmd {

std::string shape_str(const Shape& s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) {
    if (d < 0) fail("shape ", shape_str(s), " has a negative dimension");
    if (d != 0 && n > std::numeric_limits<int64_t>::max() / d) fail("shape ", shape_str(s), " is too large");
    n *= d;
  }
  return n;
}

HostTensor::HostTensor(DType dtype, Shape shape) : dtype_(dtype), shape_(std::move(shape)), writable_(true) {
  // Zero-element tensors still get a (1-byte) buffer so that empty() means "default-constructed".
  const size_t bytes = std::max<size_t>(nbytes(), 1);
  std::shared_ptr<std::byte[]> buffer(new std::byte[bytes]());
  data_ = buffer.get();
  owner_ = std::move(buffer);
}

HostTensor HostTensor::view(DType dtype, Shape shape, const void* data, std::shared_ptr<const void> owner) {
  if (data == nullptr) fail("HostTensor::view of shape ", shape_str(shape), ": data pointer is null");
  shape_numel(shape);  // validates the shape
  HostTensor t;
  t.dtype_ = dtype;
  t.shape_ = std::move(shape);
  t.data_ = data;
  t.owner_ = std::move(owner);
  t.writable_ = false;
  return t;
}

namespace {

// Stores `value` as element i of an integer buffer; it must be a whole number in the type's range.
template <class Int>
void store_integer(void* data, int64_t i, float value, DType dtype) {
  if (value != std::trunc(value) || value < static_cast<float>(std::numeric_limits<Int>::min()) ||
      value > static_cast<float>(std::numeric_limits<Int>::max())) {
    fail("value ", value, " at index ", i, " is not representable as ", dtype_name(dtype));
  }
  static_cast<Int*>(data)[i] = static_cast<Int>(value);
}

}  // namespace

HostTensor HostTensor::from_f32(const std::vector<float>& values, Shape shape, DType dtype) {
  HostTensor t(dtype, std::move(shape));
  if (static_cast<int64_t>(values.size()) != t.numel()) {
    fail("HostTensor::from_f32: ", values.size(), " values do not fill shape ", shape_str(t.shape()));
  }
  void* out = t.mutable_data();
  const auto n = static_cast<int64_t>(values.size());
  for (int64_t i = 0; i < n; ++i) {
    switch (dtype) {
      case DType::F32:
        static_cast<float*>(out)[i] = values[i];
        break;
      case DType::F16:
        static_cast<uint16_t*>(out)[i] = f32_to_f16(values[i]);
        break;
      case DType::BF16:
        static_cast<uint16_t*>(out)[i] = f32_to_bf16(values[i]);
        break;
      case DType::I32:
        store_integer<int32_t>(out, i, values[i], dtype);
        break;
      case DType::I8:
        store_integer<int8_t>(out, i, values[i], dtype);
        break;
      case DType::U8:
        store_integer<uint8_t>(out, i, values[i], dtype);
        break;
    }
  }
  return t;
}

void* HostTensor::mutable_data() {
  if (!writable_) {
    fail("tensor ", dtype_name(dtype_), shape_str(shape_),
         " is a read-only view (of a memory-mapped file); clone() it before writing");
  }
  return const_cast<void*>(data_);
}

std::vector<float> HostTensor::to_f32() const {
  const int64_t n = numel();
  std::vector<float> out(static_cast<size_t>(n));
  if (n == 0) return out;
  switch (dtype_) {
    case DType::F32:
      std::memcpy(out.data(), data_, nbytes());
      break;
    case DType::F16:
      for (int64_t i = 0; i < n; ++i) out[i] = f16_to_f32(data_as<uint16_t>()[i]);
      break;
    case DType::BF16:
      for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_f32(data_as<uint16_t>()[i]);
      break;
    case DType::I32:
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(data_as<int32_t>()[i]);
      break;
    case DType::I8:
      for (int64_t i = 0; i < n; ++i) out[i] = data_as<int8_t>()[i];
      break;
    case DType::U8:
      for (int64_t i = 0; i < n; ++i) out[i] = data_as<uint8_t>()[i];
      break;
  }
  return out;
}

HostTensor HostTensor::to(DType dtype) const {
  if (empty()) fail("HostTensor::to(", dtype_name(dtype), ") called on an empty tensor");
  if (dtype == dtype_) return clone();
  if (!is_float(dtype) && is_float(dtype_)) {
    // Silently rounding weights to integers is never what a caller wants; quantization is explicit.
    fail("cannot convert a ", dtype_name(dtype_), " tensor ", shape_str(shape_), " to ", dtype_name(dtype));
  }
  // Every conversion left goes through fp32 exactly, except I32 magnitudes above 2^24.
  return from_f32(to_f32(), shape_, dtype);
}

HostTensor HostTensor::clone() const {
  if (empty()) return {};
  HostTensor t(dtype_, shape_);
  std::memcpy(t.mutable_data(), data_, nbytes());
  return t;
}

HostTensor HostTensor::reshape(Shape shape) const {
  if (shape_numel(shape) != numel()) {
    fail("cannot reshape tensor ", shape_str(shape_), " (", numel(), " elements) to ", shape_str(shape));
  }
  HostTensor t = *this;
  t.shape_ = std::move(shape);
  return t;
}

}  // namespace lmd
