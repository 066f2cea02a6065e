// Text <-> token ids for sentencepiece checkpoints (Llama, InternLM, InternLM2), with the checkpoint's
// special tokens, plus an incremental decoder for streaming replies.
#pragma once
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace lmd {

// A sentencepiece model plus the special tokens the checkpoint declares.
//
// Special tokens are the sentencepiece control pieces (<s>, </s>), the unknown piece, and every token
// listed in tokenizer_config.json `added_tokens_decoder` / `additional_special_tokens` and
// special_tokens_map.json. Their text comes from the config where it has one: InternLM2's .model calls
// 92543 `[UNUSED_TOKEN_146]` while the config calls it `<|im_start|>`, and the config is what prompts use.
//
// Copies share the loaded model; all methods are const and safe to call from several threads.
class Tokenizer {
 public:
  // Reads dir/tokenizer.model, and dir/tokenizer_config.json and dir/special_tokens_map.json when present.
  static Tokenizer load(const std::filesystem::path& dir);
  // Reads a sentencepiece .model file alone: special tokens are its control and unknown pieces.
  static Tokenizer from_model_file(const std::filesystem::path& model_file);

  // Splits `text` on special-token text (when parse_special) and encodes the pieces between them with
  // sentencepiece, one call per piece, exactly as the reference tokenizers (Meta's Llama-2 chat code,
  // transformers' legacy Llama tokenizer) do; a model with a dummy prefix (Llama-2) therefore gives the
  // text after a special token a leading '▁' too: "</s><s>[INST]" -> 2, 1, "▁[", "INST", "]".
  // With parse_special false, special-token text is ordinary text.
  std::vector<int> encode(std::string_view text, bool add_bos, bool parse_special = true) const;

  // The inverse of encode: special tokens become their text, the ids between them are decoded by
  // sentencepiece one run at a time (so a run's first '▁' is dropped where the model adds a dummy prefix,
  // undoing what encode added). Throws lmd::Error for ids outside the vocabulary.
  std::string decode(const std::vector<int>& ids) const;

  // The piece's name: the config text for special tokens, the sentencepiece piece ("▁Hello", "<0x0A>")
  // otherwise.
  std::string id_to_piece(int id) const;
  // The id of a piece or special-token text; -1 when the vocabulary has no such piece.
  int piece_to_id(std::string_view piece) const;
  // The id of a special token by its text ("<|im_end|>"); nullopt for text that is not a special token.
  std::optional<int> special_id(std::string_view text) const;
  bool is_special(int id) const;

  int vocab_size() const;
  // -1 when the model has none.
  int bos_id() const;
  int eos_id() const;

 private:
  struct Impl;
  friend class StreamDecoder;
  explicit Tokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  std::shared_ptr<const Impl> impl_;
};

// Turns generated ids into text as they arrive. Concatenating every push() result and the final flush()
// gives exactly tokenizer.decode(all ids): a multi-byte character split over byte-fallback pieces
// (<0xE4><0xBD><0xA0>) is held back until complete, and the first piece of the reply loses its '▁' the
// way a full decode drops it, while later pieces keep theirs.
//
// Each push decodes only the ids since the last point where the output was complete, so a long reply
// costs O(length), not O(length^2).
class StreamDecoder {
 public:
  explicit StreamDecoder(Tokenizer tokenizer);

  // The text completed by `id` (often empty while a character is incomplete).
  std::string push(int id);
  // Ends the stream: returns whatever is still held back, decoded as a full decode would (an incomplete
  // byte sequence becomes U+FFFD). Pushing after flush starts a new reply.
  std::string flush();

 private:
  std::string decode_pending() const;
  std::string finish_run();

  Tokenizer tokenizer_;
  // Ids of the current run of non-special tokens that are not yet settled.
  std::vector<int> pending_;
  // Bytes of decode_pending() already returned.
  size_t emitted_ = 0;
  // Whether the current run has produced a non-space character: from then on sentencepiece strips no
  // leading space from later pieces, so settled ids can be dropped.
  bool run_has_text_ = false;
  // Whether earlier ids of the run were dropped; pending_ is then decoded after a fixed anchor piece so
  // that its first piece keeps its '▁' as it would in the middle of a full decode.
  bool anchored_ = false;
};

}  // namespace lmd
