#include "lmd/server/metrics.h"

#include <algorithm>
#include <sstream>

namespace lmd::server {

Histogram::Histogram(std::vector<double> upper_bounds)
    : bounds_(std::move(upper_bounds)), counts_(bounds_.size() + 1, 0) {}

void Histogram::observe(double value) {
  const size_t bucket = std::lower_bound(bounds_.begin(), bounds_.end(), value) - bounds_.begin();
  std::lock_guard lock(mutex_);
  ++counts_[bucket];
  sum_ += value;
  ++count_;
}

void Histogram::write(std::string& out, const std::string& name, const std::string& help) const {
  std::lock_guard lock(mutex_);
  std::ostringstream os;
  os << "# HELP " << name << " " << help << "\n# TYPE " << name << " histogram\n";
  uint64_t cumulative = 0;
  for (size_t i = 0; i < bounds_.size(); ++i) {
    cumulative += counts_[i];
    os << name << "_bucket{le=\"" << bounds_[i] << "\"} " << cumulative << "\n";
  }
  os << name << "_bucket{le=\"+Inf\"} " << count_ << "\n";
  os << name << "_sum " << sum_ << "\n" << name << "_count " << count_ << "\n";
  out += os.str();
}

ServerMetrics::ServerMetrics()
    : time_to_first_token({0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}),
      time_per_output_token({0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1}),
      request_latency({0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300}) {}

void ServerMetrics::count_response(int status) {
  std::lock_guard lock(mutex_);
  ++responses_by_status_[status];
}

std::string ServerMetrics::render(const EngineStats& engine) const {
  std::string out;
  auto metric = [&](const char* name, const char* type, const char* help, auto value) {
    out += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " " + type + "\n" + name + " " +
           std::to_string(value) + "\n";
  };
  metric("lmd_requests_running", "gauge", "Sequences in the engine's running batch.", engine.running);
  metric("lmd_requests_waiting", "gauge", "Sequences queued for the engine.", engine.waiting);
  metric("lmd_http_generations_in_flight", "gauge", "HTTP requests generating or waiting to.",
         generations_in_flight.load());
  metric("lmd_sessions", "gauge", "Interactive sessions holding state.", engine.sessions);
  metric("lmd_kv_blocks_used", "gauge", "KV cache blocks in use.", engine.blocks_used);
  metric("lmd_kv_blocks_free", "gauge", "KV cache blocks free.", engine.blocks_free);
  metric("lmd_prompt_tokens_total", "counter", "Prompt tokens prefilled.", engine.prompt_tokens);
  metric("lmd_generation_tokens_total", "counter", "Tokens generated.", engine.generated_tokens);
  metric("lmd_preemptions_total", "counter", "Sequences preempted for KV blocks.", engine.preemptions);
  {
    std::lock_guard lock(mutex_);
    out +=
        "# HELP lmd_http_responses_total HTTP responses by status.\n# TYPE lmd_http_responses_total "
        "counter\n";
    for (const auto& [status, count] : responses_by_status_)
      out +=
          "lmd_http_responses_total{code=\"" + std::to_string(status) + "\"} " + std::to_string(count) + "\n";
  }
  time_to_first_token.write(out, "lmd_time_to_first_token_seconds", "Time from request to first token.");
  time_per_output_token.write(out, "lmd_time_per_output_token_seconds", "Time between generated tokens.");
  request_latency.write(out, "lmd_request_latency_seconds", "Time from request to its last token.");
  return out;
}

}  // namespace lmd::server
