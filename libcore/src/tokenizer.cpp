#include "lmd/core/tokenizer.h"

#include <sentencepiece_processor.h>

#include <algorithm>
#include <array>
#include <map>
#include <nlohmann/json.hpp>
#include <unordered_map>

#include "json_file.h"
#include "lmd/core/error.h"

namespace lmd {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// Token fields appear as "<s>" or as {"content": "<s>", ...}.
std::optional<std::string> token_text(const json& value) {
  if (value.is_string()) return value.get<std::string>();
  if (value.is_object() && value.contains("content") && value["content"].is_string()) {
    return value["content"].get<std::string>();
  }
  return std::nullopt;
}

size_t trailing_replacement_bytes(const std::string& text) {
  // U+FFFD, what sentencepiece decodes an incomplete byte sequence to.
  constexpr std::string_view replacement = "\xEF\xBF\xBD";
  size_t end = text.size();
  while (end >= replacement.size() &&
         std::string_view(text).substr(end - replacement.size(), replacement.size()) == replacement) {
    end -= replacement.size();
  }
  return text.size() - end;
}

bool has_visible_char(std::string_view text) {
  return std::any_of(text.begin(), text.end(), [](char c) {
    return std::string_view(" \t\n\r\v\f").find(c) == std::string_view::npos;
  });
}

}  // namespace

struct Tokenizer::Impl {
  sentencepiece::SentencePieceProcessor sp;
  fs::path model_file;
  int sp_size = 0;
  int vocab_size = 0;
  int bos = -1;
  int eos = -1;
  std::unordered_map<int, std::string> special_text;
  std::map<std::string, int, std::less<>> special_by_text;
  // Special-token texts by first byte, longest first, so that encode finds the longest match quickly.
  std::array<std::vector<std::pair<std::string, int>>, 256> specials_by_first_byte;
  // A piece that decodes to visible text with no leading space (see StreamDecoder); -1 if none.
  int anchor_id = -1;
  std::string anchor_text;

  void add_special(int id, const std::string& text) {
    // The config may rename a piece (InternLM2's placeholders); the old name no longer denotes it.
    if (auto old = special_text.find(id); old != special_text.end() && special_by_text[old->second] == id) {
      special_by_text.erase(old->second);
    }
    special_text[id] = text;
    special_by_text[text] = id;
  }
  bool is_special(int id) const { return special_text.count(id) != 0; }

  void check_id(int id) const {
    if (id < 0 || id >= vocab_size)
      fail("token id ", id, " is outside the vocabulary of ", model_file, " (size ", vocab_size, ")");
  }

  // Decodes ids that contain no special token.
  std::string decode_run(const std::vector<int>& ids) const {
    std::string text;
    if (ids.empty()) return text;
    auto status = sp.Decode(ids, &text);
    if (!status.ok()) fail("tokenizer ", model_file, ": cannot decode ids: ", status.ToString());
    return text;
  }

  void encode_run(std::string_view text, std::vector<int>& out) const {
    if (text.empty()) return;
    std::vector<int> ids;
    auto status = sp.Encode(text, &ids);
    if (!status.ok()) fail("tokenizer ", model_file, ": cannot encode text: ", status.ToString());
    out.insert(out.end(), ids.begin(), ids.end());
  }

  // The id whose piece or special text is `text`, if the vocabulary has it.
  std::optional<int> find_piece(std::string_view text) const {
    if (auto it = special_by_text.find(text); it != special_by_text.end()) return it->second;
    int id = sp.PieceToId(text);
    // PieceToId answers the unknown id for text it does not know.
    if (id == sp.unk_id() && sp.IdToPiece(id) != text) return std::nullopt;
    return id;
  }

  void finish() {
    vocab_size = sp_size;
    for (const auto& [id, text] : special_text) vocab_size = std::max(vocab_size, id + 1);
    for (auto& bucket : specials_by_first_byte) bucket.clear();
    for (const auto& [text, id] : special_by_text) {
      if (!text.empty()) specials_by_first_byte[static_cast<unsigned char>(text[0])].emplace_back(text, id);
    }
    for (auto& bucket : specials_by_first_byte) {
      std::sort(bucket.begin(), bucket.end(),
                [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
    }
    find_anchor();
  }

  static std::shared_ptr<Impl> load_model(const fs::path& model_file) {
    if (!fs::exists(model_file))
      fail("tokenizer: ", model_file, " not found (expected a sentencepiece tokenizer.model)");
    auto impl = std::make_shared<Impl>();
    impl->model_file = model_file;
    auto status = impl->sp.Load(model_file.string());
    if (!status.ok())
      fail("tokenizer: cannot load ", model_file, " as a sentencepiece model: ", status.ToString());
    impl->sp_size = impl->sp.GetPieceSize();
    for (int id = 0; id < impl->sp_size; ++id) {
      if (impl->sp.IsControl(id) || impl->sp.IsUnknown(id)) impl->add_special(id, impl->sp.IdToPiece(id));
    }
    impl->bos = impl->sp.bos_id();
    impl->eos = impl->sp.eos_id();
    return impl;
  }

  // Special tokens and bos/eos from one of the transformers tokenizer files.
  void apply_token_config(const fs::path& path) {
    if (!fs::exists(path)) return;
    json config = read_json_file(path);
    if (!config.is_object()) fail(path, ": expected a JSON object");
    if (auto decoder = config.find("added_tokens_decoder"); decoder != config.end() && decoder->is_object()) {
      for (const auto& [key, entry] : decoder->items()) {
        auto text = token_text(entry);
        if (!text)
          fail(path, ": added_tokens_decoder.", key, ": expected an object with a \"content\" string");
        int id = 0;
        try {
          id = std::stoi(key);
        } catch (const std::exception&) {
          fail(path, ": added_tokens_decoder key '", key, "': expected a token id");
        }
        if (id < 0) fail(path, ": added_tokens_decoder key '", key, "': expected a non-negative token id");
        add_special(id, *text);
      }
    }
    if (auto extra = config.find("additional_special_tokens"); extra != config.end() && extra->is_array()) {
      for (const auto& entry : *extra) {
        auto text = token_text(entry);
        if (!text) continue;
        if (auto id = find_piece(*text)) add_special(*id, *text);
      }
    }
    // Registers the text of a named token as special and answers its id.
    auto named_token = [&](const char* field) -> std::optional<int> {
      auto it = config.find(field);
      if (it == config.end()) return std::nullopt;
      auto text = token_text(*it);
      if (!text) return std::nullopt;  // null: the checkpoint names no such token.
      auto id = find_piece(*text);
      if (!id) fail(path, ": ", field, " '", *text, "' is not in the vocabulary of ", model_file);
      add_special(*id, *text);
      return id;
    };
    if (auto id = named_token("bos_token")) bos = *id;
    if (auto id = named_token("eos_token")) eos = *id;
    named_token("unk_token");
  }

  void find_anchor() {
    for (int id = 0; id < sp_size; ++id) {
      if (is_special(id) || sp.IsByte(id) || sp.IsUnused(id)) continue;
      std::string text = decode_run({id});
      bool plain = !text.empty() && std::all_of(text.begin(), text.end(), [](char c) {
        return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
      });
      if (plain && sp.IdToPiece(id) == text) {
        anchor_id = id;
        anchor_text = text;
        return;
      }
    }
  }
};

Tokenizer Tokenizer::load(const fs::path& dir) {
  auto impl = Impl::load_model(dir / "tokenizer.model");
  // tokenizer_config.json last: it is the file transformers itself reads, so it wins where both speak.
  impl->apply_token_config(dir / "special_tokens_map.json");
  impl->apply_token_config(dir / "tokenizer_config.json");
  impl->finish();
  return Tokenizer(std::move(impl));
}

Tokenizer Tokenizer::from_model_file(const fs::path& model_file) {
  auto impl = Impl::load_model(model_file);
  impl->finish();
  return Tokenizer(std::move(impl));
}

std::vector<int> Tokenizer::encode(std::string_view text, bool add_bos, bool parse_special) const {
  const Impl& impl = *impl_;
  std::vector<int> ids;
  if (add_bos && impl.bos >= 0) ids.push_back(impl.bos);
  size_t run_start = 0;
  if (parse_special) {
    size_t pos = 0;
    while (pos < text.size()) {
      const auto& candidates = impl.specials_by_first_byte[static_cast<unsigned char>(text[pos])];
      auto match = std::find_if(candidates.begin(), candidates.end(),
                                [&](const auto& c) { return text.substr(pos, c.first.size()) == c.first; });
      if (match == candidates.end()) {
        ++pos;
        continue;
      }
      impl.encode_run(text.substr(run_start, pos - run_start), ids);
      ids.push_back(match->second);
      pos += match->first.size();
      run_start = pos;
    }
  }
  impl.encode_run(text.substr(run_start), ids);
  return ids;
}

std::string Tokenizer::decode(const std::vector<int>& ids) const {
  const Impl& impl = *impl_;
  std::string text;
  std::vector<int> run;
  for (int id : ids) {
    impl.check_id(id);
    if (!impl.is_special(id)) {
      run.push_back(id);
      continue;
    }
    text += impl.decode_run(run);
    run.clear();
    text += impl.special_text.at(id);
  }
  text += impl.decode_run(run);
  return text;
}

std::string Tokenizer::id_to_piece(int id) const {
  impl_->check_id(id);
  if (auto it = impl_->special_text.find(id); it != impl_->special_text.end()) return it->second;
  return impl_->sp.IdToPiece(id);
}

int Tokenizer::piece_to_id(std::string_view piece) const { return impl_->find_piece(piece).value_or(-1); }

std::optional<int> Tokenizer::special_id(std::string_view text) const {
  if (auto it = impl_->special_by_text.find(text); it != impl_->special_by_text.end()) return it->second;
  return std::nullopt;
}

bool Tokenizer::is_special(int id) const { return impl_->is_special(id); }
int Tokenizer::vocab_size() const { return impl_->vocab_size; }
int Tokenizer::bos_id() const { return impl_->bos; }
int Tokenizer::eos_id() const { return impl_->eos; }

StreamDecoder::StreamDecoder(Tokenizer tokenizer) : tokenizer_(std::move(tokenizer)) {}

std::string StreamDecoder::decode_pending() const {
  const Tokenizer::Impl& impl = *tokenizer_.impl_;
  if (!anchored_) return impl.decode_run(pending_);
  std::vector<int> ids;
  ids.reserve(pending_.size() + 1);
  ids.push_back(impl.anchor_id);
  ids.insert(ids.end(), pending_.begin(), pending_.end());
  return impl.decode_run(ids).substr(impl.anchor_text.size());
}

std::string StreamDecoder::finish_run() {
  std::string text = decode_pending();
  std::string rest = text.size() > emitted_ ? text.substr(emitted_) : std::string();
  pending_.clear();
  emitted_ = 0;
  run_has_text_ = false;
  anchored_ = false;
  return rest;
}

std::string StreamDecoder::push(int id) {
  const Tokenizer::Impl& impl = *tokenizer_.impl_;
  impl.check_id(id);
  if (impl.is_special(id)) return finish_run() + impl.special_text.at(id);

  pending_.push_back(id);
  std::string text = decode_pending();
  size_t complete = text.size() - trailing_replacement_bytes(text);
  std::string out;
  if (complete > emitted_) {
    out = text.substr(emitted_, complete - emitted_);
    emitted_ = complete;
  }
  run_has_text_ = run_has_text_ || has_visible_char(out);
  // Settle the pending ids once the text is complete and no later piece can lose its leading space.
  if (run_has_text_ && complete == text.size() && impl.anchor_id >= 0) {
    pending_.clear();
    emitted_ = 0;
    anchored_ = true;
  }
  return out;
}

std::string StreamDecoder::flush() { return finish_run(); }

}  // namespace lmd
