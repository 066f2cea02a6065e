// Calibration and evaluation text (BRIEF §5): named datasets are read from local files only, never
// downloaded. The folder is --dataset-dir, else $LMD_DATASETS, else ../shared/datasets beside the
// working directory's checkout.
#pragma once
#include <filesystem>
#include <string>
#include <vector>

#include "lmd/core/tokenizer.h"

namespace lmd {

// The folder that holds the named datasets.
std::filesystem::path dataset_root(const std::string& dataset_dir_flag);

// The file behind a dataset name for a split ("train" for calibration, "valid"/"test" for
// evaluation): ptb -> ptb/ptb.<split>.txt, wikitext2 -> wikitext-2-raw/wiki.<split>.raw, c4 and
// pileval -> <name>/<split> jsonl files; any other name is a path to a text file. Throws lmd::Error
// naming the file and where it was looked for when it is missing.
std::filesystem::path dataset_file(const std::string& name, const std::string& split,
                                   const std::string& dataset_dir_flag);

// The dataset's text: lines joined with "\n\n" (PTB: one sentence per line); jsonl files contribute
// each record's "text" field.
std::string load_dataset_text(const std::filesystem::path& file);

// `samples` windows of `seqlen` tokens drawn with a fixed seed from the tokenized text.
std::vector<std::vector<int>> sample_calibration_windows(const std::vector<int>& tokens, int samples,
                                                         int seqlen, uint64_t seed = 42);

}  // namespace lmd
