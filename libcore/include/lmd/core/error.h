// Errors that reach the user: one message naming the file, field or flag and what was expected.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace lmd {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// fail("file ", path, ": expected ", n, " bytes") throws lmd::Error with the parts joined.
template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw Error(os.str());
}

}  // namespace lmd
