#include <cstdio>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "lmd/core/error.h"
#include "lmd/core/tokenizer.h"
#include "test_support.h"

namespace {

namespace fs = std::filesystem;
using lmd::StreamDecoder;
using lmd::Tokenizer;

fs::path tokenizers_dir() { return lmd::test::assets_dir() / "tokenizers"; }

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

bool valid_utf8(std::string_view text) {
  size_t i = 0;
  while (i < text.size()) {
    auto lead = static_cast<unsigned char>(text[i]);
    size_t length = lead < 0x80           ? 1
                    : (lead >> 5) == 0x6  ? 2
                    : (lead >> 4) == 0xE  ? 3
                    : (lead >> 3) == 0x1E ? 4
                                          : 0;
    if (length == 0 || i + length > text.size()) return false;
    for (size_t k = 1; k < length; ++k) {
      if ((static_cast<unsigned char>(text[i + k]) >> 6) != 0x2) return false;
    }
    i += length;
  }
  return true;
}

// Streams `ids` and checks the pieces join to the full decode, each piece being whole UTF-8.
void check_stream(const Tokenizer& tokenizer, const std::vector<int>& ids) {
  StreamDecoder stream(tokenizer);
  std::string joined;
  for (int id : ids) {
    std::string piece = stream.push(id);
    CHECK(valid_utf8(piece));
    joined += piece;
  }
  joined += stream.flush();
  CHECK(joined == tokenizer.decode(ids));
}

const std::vector<std::string>& sample_texts() {
  static const std::vector<std::string> texts = {
      "Hello world",
      " Hello world",
      "  two leading spaces, and trailing  ",
      "\n\nnewlines first\n",
      "\t tabs\tand\nnewlines\n\n",
      "你好，世界！今天天气很好。",
      "混合 text 和 中文 with spaces",
      "emoji 😀👍🏽 and a family 👨‍👩‍👧‍👦 in one",
      "🚀",
      " 🦙.cpp",
      "café naïve Äpfel нещо на Български",
      "កាន់តែពិសេសអាចខលចេញ",
      "Cửa Việt 1234567890 3.14159",
      "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n你好<|im_end|>",
      "[INST] tell me [/INST] Sure </s><s>[INST] again",
      "   ",
  };
  return texts;
}

}  // namespace

TEST_CASE("tokenizer: sentencepiece test vectors encode and decode exactly", "[tokenizer]") {
  LMD_REQUIRE_ASSETS();
  auto vectors = nlohmann::json::parse(read_file(tokenizers_dir() / "test-vectors" / "sp_test_vectors.json"));
  struct Subject {
    std::string name;
    Tokenizer tokenizer;
  };
  Tokenizer internlm2_raw = Tokenizer::from_model_file(tokenizers_dir() / "internlm2" / "tokenizer.model");
  std::vector<Subject> subjects = {
      {"llama2", Tokenizer::from_model_file(tokenizers_dir() / "llama2" / "tokenizer.model")},
      {"tok512_stories260K", Tokenizer::load(lmd::test::model_dir("stories260K"))},
      {"internlm2", internlm2_raw},
      {"internlm2", Tokenizer::load(tokenizers_dir() / "internlm2")},
  };
  int checked = 0;
  for (const auto& [name, tokenizer] : subjects) {
    const auto& spec = vectors["tokenizers"][name];
    REQUIRE(tokenizer.vocab_size() == spec["vocab_size"].get<int>());
    CHECK(tokenizer.bos_id() == spec["bos_id"].get<int>());
    CHECK(tokenizer.eos_id() == spec["eos_id"].get<int>());
    for (const auto& item : spec["cases"]) {
      auto text = item["text"].get<std::string>();
      auto ids = item["ids"].get<std::vector<int>>();
      auto expected_text = item["decoded"].get<std::string>();
      // The vectors come from the bare .model, where InternLM2's special ids carry placeholder names;
      // with the checkpoint's config those ids decode to the config's text instead.
      for (int id : ids) {
        std::string raw_piece = internlm2_raw.id_to_piece(id < internlm2_raw.vocab_size() ? id : 0);
        if (name == "internlm2" && tokenizer.is_special(id) && tokenizer.id_to_piece(id) != raw_piece) {
          expected_text.replace(expected_text.find(raw_piece), raw_piece.size(), tokenizer.id_to_piece(id));
        }
      }
      INFO(name << ": " << text);
      CHECK(tokenizer.encode(text, /*add_bos=*/false, /*parse_special=*/false) == ids);
      CHECK(tokenizer.decode(ids) == expected_text);
      ++checked;
    }
  }
  CHECK(checked == 4 * 54);
}

TEST_CASE("tokenizer: llama.cpp spm vocab vectors encode exactly", "[tokenizer]") {
  LMD_REQUIRE_ASSETS();
  const fs::path base = tokenizers_dir() / "llama2" / "ggml-vocab-llama-spm.gguf";
  // .inp: each input followed by "\n__ggml_vocab_test__\n"; .out: one line of ids per input.
  std::string inputs = read_file(base.string() + ".inp");
  const std::string marker = "\n__ggml_vocab_test__\n";
  std::vector<std::string> texts;
  for (size_t start = 0, end; (end = inputs.find(marker, start)) != std::string::npos;
       start = end + marker.size()) {
    texts.push_back(inputs.substr(start, end - start));
  }
  std::ifstream outputs(base.string() + ".out");
  std::vector<std::vector<int>> expected;
  for (std::string line; std::getline(outputs, line);) {
    std::istringstream numbers(line);
    expected.emplace_back(std::istream_iterator<int>(numbers), std::istream_iterator<int>());
  }
  REQUIRE(texts.size() == 46);
  REQUIRE(expected.size() == texts.size());
  Tokenizer tokenizer = Tokenizer::load(tokenizers_dir() / "llama2");
  for (size_t i = 0; i < texts.size(); ++i) {
    INFO("input " << i << ": " << texts[i]);
    CHECK(tokenizer.encode(texts[i], /*add_bos=*/false) == expected[i]);
  }
}

TEST_CASE("tokenizer: InternLM2 special tokens come from tokenizer_config.json", "[tokenizer]") {
  LMD_REQUIRE_ASSETS();
  Tokenizer tokenizer = Tokenizer::load(tokenizers_dir() / "internlm2");
  const std::vector<std::pair<std::string, int>> specials = {
      {"<|plugin|>", 92538},       {"<|interpreter|>", 92539}, {"<|action_end|>", 92540},
      {"<|action_start|>", 92541}, {"<|im_end|>", 92542},      {"<|im_start|>", 92543},
  };
  for (const auto& [text, id] : specials) {
    INFO(text);
    CHECK(tokenizer.encode(text, false) == std::vector<int>{id});
    CHECK(tokenizer.special_id(text) == id);
    CHECK(tokenizer.is_special(id));
    CHECK(tokenizer.id_to_piece(id) == text);
    CHECK(tokenizer.piece_to_id(text) == id);
    CHECK(tokenizer.decode({id}) == text);
    CHECK(tokenizer.encode(text, false, /*parse_special=*/false).size() > 1);
  }
  CHECK(tokenizer.encode("<|im_end|>", /*add_bos=*/true) == std::vector<int>{1, 92542});
  CHECK_FALSE(tokenizer.special_id("<|not_a_token|>").has_value());
  CHECK(tokenizer.piece_to_id("<|not_a_token|>") == -1);
  CHECK_FALSE(tokenizer.is_special(1000));

  // Text around special tokens is encoded piece by piece; InternLM2 adds no dummy prefix.
  const std::string prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n";
  std::vector<int> expected = {92543};
  for (int id : tokenizer.encode("user\nHi", false, false)) expected.push_back(id);
  expected.push_back(92542);
  for (int id : tokenizer.encode("\n", false, false)) expected.push_back(id);
  expected.push_back(92543);
  for (int id : tokenizer.encode("assistant\n", false, false)) expected.push_back(id);
  CHECK(tokenizer.encode(prompt, false) == expected);
  CHECK(tokenizer.decode(tokenizer.encode(prompt, true)) == "<s>" + prompt);
}

TEST_CASE("tokenizer: Llama-2 text after a special token gets the dummy prefix", "[tokenizer]") {
  LMD_REQUIRE_ASSETS();
  Tokenizer tokenizer = Tokenizer::load(tokenizers_dir() / "llama2");
  CHECK(tokenizer.bos_id() == 1);
  CHECK(tokenizer.eos_id() == 2);
  CHECK(tokenizer.special_id("<s>") == 1);
  CHECK(tokenizer.special_id("</s>") == 2);
  std::vector<int> ids = tokenizer.encode("</s><s>[INST] hi [/INST]", false);
  std::vector<int> expected = {2, 1};
  for (int id : tokenizer.encode("[INST] hi [/INST]", false, false)) expected.push_back(id);
  CHECK(ids == expected);
  CHECK(tokenizer.id_to_piece(ids[2]) == "▁[");
  CHECK(tokenizer.decode(ids) == "</s><s>[INST] hi [/INST]");
  CHECK(tokenizer.encode("Hello", true) == std::vector<int>{1, 15043});
}

TEST_CASE("tokenizer: errors name the file and the id", "[tokenizer]") {
  LMD_REQUIRE_ASSETS();
  fs::path empty = fs::temp_directory_path() / "lmd_test_tokenizer_missing";
  fs::create_directories(empty);
  try {
    Tokenizer::load(empty);
    FAIL("expected lmd::Error");
  } catch (const lmd::Error& e) {
    CHECK(std::string(e.what()).find((empty / "tokenizer.model").string()) != std::string::npos);
  }
  fs::remove_all(empty);
  Tokenizer tokenizer = Tokenizer::load(tokenizers_dir() / "llama2");
  CHECK_THROWS_AS(tokenizer.decode({32000}), lmd::Error);
  CHECK_THROWS_AS(tokenizer.decode({-1}), lmd::Error);
}

TEST_CASE("tokenizer: streamed decode equals the full decode", "[tokenizer][stream]") {
  LMD_REQUIRE_ASSETS();
  std::vector<Tokenizer> tokenizers = {
      Tokenizer::load(tokenizers_dir() / "llama2"),
      Tokenizer::load(lmd::test::model_dir("stories260K")),
      Tokenizer::load(tokenizers_dir() / "internlm2"),
  };
  for (const auto& tokenizer : tokenizers) {
    for (const auto& text : sample_texts()) {
      INFO("vocab " << tokenizer.vocab_size() << ": " << text);
      check_stream(tokenizer, tokenizer.encode(text, false));
      check_stream(tokenizer, tokenizer.encode(text, true));
    }
    // Arbitrary id sequences, rich in byte-fallback pieces, spaces and special tokens: byte runs that are
    // cut short or invalid must come out as the full decode has them.
    std::mt19937 rng(1234);
    std::vector<int> interesting;
    for (const auto& text : sample_texts()) {
      for (int id : tokenizer.encode(text, false)) interesting.push_back(id);
    }
    for (int byte = 0; byte < 256; ++byte) {
      char hex[8];
      std::snprintf(hex, sizeof hex, "<0x%02X>", byte);
      if (int id = tokenizer.piece_to_id(hex); id >= 0) interesting.push_back(id);
    }
    std::uniform_int_distribution<size_t> pick(0, interesting.size() - 1);
    std::uniform_int_distribution<int> any(0, tokenizer.vocab_size() - 1);
    for (int trial = 0; trial < 200; ++trial) {
      std::vector<int> ids(1 + trial % 40);
      for (int& id : ids) id = (rng() % 4 == 0) ? any(rng) : interesting[pick(rng)];
      INFO("vocab " << tokenizer.vocab_size() << ", trial " << trial);
      check_stream(tokenizer, ids);
    }
  }
}

TEST_CASE("tokenizer: stream decoder holds back incomplete characters", "[tokenizer][stream]") {
  LMD_REQUIRE_ASSETS();
  Tokenizer tokenizer = Tokenizer::load(lmd::test::model_dir("stories260K"));
  // tok512 has no piece for 你 (E4 BD A0): it is three byte-fallback pieces.
  std::vector<int> ids = tokenizer.encode("a你", false);
  REQUIRE(ids.size() == 4);
  StreamDecoder stream(tokenizer);
  std::vector<std::string> pieces;
  for (int id : ids) pieces.push_back(stream.push(id));
  CHECK(pieces == std::vector<std::string>{"a", "", "", "你"});
  CHECK(stream.flush().empty());

  // tok512 strips every leading space of a decode (it removes extra whitespace), not just the first '▁'.
  const int space = tokenizer.piece_to_id("▁");
  const int space_t = tokenizer.piece_to_id("▁t");
  check_stream(tokenizer, {space, space, space_t, space, space_t});
  CHECK(tokenizer.decode({space, space, space_t}) == "t");

  // The first piece of a reply loses its space as in a full decode; later ones keep it.
  Tokenizer llama = Tokenizer::load(tokenizers_dir() / "llama2");
  StreamDecoder reply(llama);
  CHECK(reply.push(llama.piece_to_id("▁Hello")) == "Hello");
  CHECK(reply.push(llama.piece_to_id("▁world")) == " world");
  CHECK(reply.flush().empty());
  CHECK(reply.push(llama.piece_to_id("▁Hello")) == "Hello");
}
