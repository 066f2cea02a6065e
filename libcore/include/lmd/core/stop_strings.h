// Stops a streamed reply at any of a set of strings, which may span several tokens: text that could be
// the start of a stop string is held back until it is known either way.
#pragma once
#include <string>
#include <string_view>
#include <vector>

namespace lmd {

class StopStringMatcher {
 public:
  explicit StopStringMatcher(std::vector<std::string> stops);
  // Appends newly decoded text; returns the text that is now safe to show. After a match, returns the
  // text before the stop string and stopped() is true; later calls return nothing.
  std::string push(std::string_view text);
  // The end of the reply: whatever was held back (nothing after a match).
  std::string flush();
  bool stopped() const { return stopped_; }
  // The stop string that matched (empty when none did).
  const std::string& matched() const { return matched_; }

 private:
  std::vector<std::string> stops_;
  std::string held_;
  bool stopped_ = false;
  std::string matched_;
};

}  // namespace lmd
