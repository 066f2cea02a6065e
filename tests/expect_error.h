// Checking what an error says, without Catch2 string matchers (their names differ between 2.x and 3.x).
#pragma once
#include <initializer_list>
#include <string>
#include <string_view>

#include "test_support.h"

namespace lmd::test {

// The what() of the `Exception` that `action` throws, or "" (after failing the test) when none is thrown.
template <class Exception, class Action>
std::string error_of(Action&& action) {
  try {
    action();
  } catch (const Exception& e) {
    return e.what();
  }
  FAIL_CHECK("expected an exception, none was thrown");
  return {};
}

inline bool contains_all(const std::string& text, std::initializer_list<std::string_view> parts) {
  for (std::string_view part : parts) {
    if (text.find(part) == std::string::npos) return false;
  }
  return true;
}

}  // namespace lmd::test

// CHECK_ERROR(lmd::Error, expr, "part", ...): expr throws that exception and its message holds every part.
#define CHECK_ERROR(Exception, expr, ...)                                                   \
  do {                                                                                      \
    const std::string lmd_message_ = lmd::test::error_of<Exception>([&] { (void)(expr); }); \
    INFO("message: " << lmd_message_);                                                      \
    CHECK(lmd::test::contains_all(lmd_message_, {__VA_ARGS__}));                            \
  } while (0)
