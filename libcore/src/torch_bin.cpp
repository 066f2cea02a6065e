#include "lmd/core/torch_bin.h"

#include <bit>
#include <cstdio>
#include <cstring>
#include <optional>
#include <unordered_map>

#include "lmd/core/error.h"

namespace lmd {

namespace {

// Little-endian fixed-width reads with bounds checks; every failure names the file.
class ByteReader {
 public:
  ByteReader(const std::byte* data, size_t size, std::string where)
      : data_(data), size_(size), where_(std::move(where)) {}

  uint64_t read(size_t pos, size_t width, const char* what) const {
    if (pos > size_ || width > size_ - pos) {
      fail(where_, ": truncated while reading ", what, " at offset ", pos, " (size ", size_, ")");
    }
    uint64_t v = 0;
    for (size_t i = width; i-- > 0;) v = (v << 8) | static_cast<uint8_t>(data_[pos + i]);
    return v;
  }
  uint16_t u16(size_t pos, const char* what) const { return static_cast<uint16_t>(read(pos, 2, what)); }
  uint32_t u32(size_t pos, const char* what) const { return static_cast<uint32_t>(read(pos, 4, what)); }
  uint64_t u64(size_t pos, const char* what) const { return read(pos, 8, what); }
  std::string text(size_t pos, size_t len, const char* what) const {
    if (pos > size_ || len > size_ - pos)
      fail(where_, ": truncated while reading ", what, " at offset ", pos);
    return std::string(reinterpret_cast<const char*>(data_ + pos), len);
  }

 private:
  const std::byte* data_;
  size_t size_;
  std::string where_;
};

// ---- zip ----------------------------------------------------------------------------------------

constexpr uint32_t kLocalHeaderSig = 0x04034b50;
constexpr uint32_t kCentralHeaderSig = 0x02014b50;
constexpr uint32_t kEndOfCentralDirSig = 0x06054b50;
constexpr uint32_t kZip64EndOfCentralDirSig = 0x06064b50;
constexpr uint32_t kZip64LocatorSig = 0x07064b50;
constexpr uint16_t kZip64ExtraId = 0x0001;

struct ZipEntry {
  uint16_t method = 0;  // 0 = stored
  uint16_t flags = 0;
  uint64_t compressed_size = 0;
  uint64_t size = 0;
  uint64_t local_header_offset = 0;
};

std::unordered_map<std::string, ZipEntry> read_zip_directory(const ByteReader& in, size_t file_size,
                                                             const std::string& where) {
  // The end-of-central-directory record is the last 22 bytes plus a comment of up to 64 KiB.
  if (file_size < 22) fail(where, ": ", file_size, " bytes is too short to be a zip archive");
  std::optional<size_t> eocd;
  const size_t lowest = file_size > 22 + 0xffff ? file_size - 22 - 0xffff : 0;
  for (size_t pos = file_size - 22 + 1; pos-- > lowest;) {
    if (in.u32(pos, "zip end record") == kEndOfCentralDirSig) {
      eocd = pos;
      break;
    }
  }
  if (!eocd)
    fail(where, ": no zip end-of-central-directory record (truncated, or not a torch.save zip file)");
  uint64_t entry_count = in.u16(*eocd + 10, "zip entry count");
  uint64_t directory_size = in.u32(*eocd + 12, "zip directory size");
  uint64_t directory_offset = in.u32(*eocd + 16, "zip directory offset");
  if (entry_count == 0xffff || directory_size == 0xffffffff || directory_offset == 0xffffffff) {
    // Zip64: the real values live in the zip64 end record, found through the locator just before.
    if (*eocd < 20 || in.u32(*eocd - 20, "zip64 locator") != kZip64LocatorSig) {
      fail(where, ": zip end record needs zip64 values but has no zip64 locator");
    }
    const uint64_t record = in.u64(*eocd - 20 + 8, "zip64 end record offset");
    if (in.u32(record, "zip64 end record") != kZip64EndOfCentralDirSig) {
      fail(where, ": zip64 end record missing at offset ", record);
    }
    entry_count = in.u64(record + 32, "zip64 entry count");
    directory_size = in.u64(record + 40, "zip64 directory size");
    directory_offset = in.u64(record + 48, "zip64 directory offset");
  }
  if (directory_offset > file_size || directory_size > file_size - directory_offset) {
    fail(where, ": zip central directory [", directory_offset, ", +", directory_size,
         ") lies outside the file (", file_size, " bytes; truncated?)");
  }

  std::unordered_map<std::string, ZipEntry> entries;
  size_t pos = directory_offset;
  for (uint64_t i = 0; i < entry_count; ++i) {
    if (in.u32(pos, "zip directory entry") != kCentralHeaderSig) {
      fail(where, ": zip central directory entry ", i, " at offset ", pos, " has a bad signature");
    }
    ZipEntry entry;
    entry.flags = in.u16(pos + 8, "zip entry flags");
    entry.method = in.u16(pos + 10, "zip entry method");
    entry.compressed_size = in.u32(pos + 20, "zip entry size");
    entry.size = in.u32(pos + 24, "zip entry size");
    const uint16_t name_len = in.u16(pos + 28, "zip entry name length");
    const uint16_t extra_len = in.u16(pos + 30, "zip entry extra length");
    const uint16_t comment_len = in.u16(pos + 32, "zip entry comment length");
    entry.local_header_offset = in.u32(pos + 42, "zip entry offset");
    std::string name = in.text(pos + 46, name_len, "zip entry name");

    // Zip64 extra field: 8-byte values for exactly those fields that hold 0xffffffff, in this order.
    size_t extra = pos + 46 + name_len;
    const size_t extra_end = extra + extra_len;
    while (extra + 4 <= extra_end) {
      const uint16_t id = in.u16(extra, "zip extra id");
      const uint16_t len = in.u16(extra + 2, "zip extra length");
      if (id == kZip64ExtraId) {
        size_t field = extra + 4;
        for (uint64_t* value : {&entry.size, &entry.compressed_size, &entry.local_header_offset}) {
          if (*value != 0xffffffff) continue;
          if (field + 8 > extra + 4 + len) fail(where, ": zip64 extra field of '", name, "' is too short");
          *value = in.u64(field, "zip64 extra value");
          field += 8;
        }
      }
      extra += 4 + static_cast<size_t>(len);
    }
    entries[std::move(name)] = entry;
    pos = extra_end + comment_len;
  }
  return entries;
}

// The bytes of a stored entry, located through its local header (whose own size fields torch leaves
// zero, so the central directory's sizes are the ones used).
std::pair<size_t, size_t> stored_entry_span(const ByteReader& in, size_t file_size, const std::string& name,
                                            const ZipEntry& entry, const std::string& where) {
  if (entry.flags & 1) fail(where, ": zip entry '", name, "' is encrypted");
  if (entry.method != 0 || entry.compressed_size != entry.size) {
    fail(where, ": zip entry '", name, "' is compressed (method ", entry.method,
         "); torch.save writes stored entries, re-save the checkpoint without compression");
  }
  const size_t header = entry.local_header_offset;
  if (in.u32(header, "zip local header") != kLocalHeaderSig) {
    fail(where, ": zip entry '", name, "' has no local header at offset ", header);
  }
  const size_t begin = header + 30 + in.u16(header + 26, "zip local name length") +
                       in.u16(header + 28, "zip local extra length");
  if (begin > file_size || entry.size > file_size - begin) {
    fail(where, ": zip entry '", name, "' (", entry.size, " bytes at offset ", begin,
         ") runs past the end of the file (truncated?)");
  }
  return {begin, static_cast<size_t>(entry.size)};
}

// ---- pickle -------------------------------------------------------------------------------------

struct PyObject;
using PyRef = std::shared_ptr<PyObject>;

// The few Python values a state-dict pickle builds.
struct PyObject {
  enum class Kind { None, Bool, Int, Float, String, Tuple, List, Dict, Global, Storage, Tensor };
  Kind kind = Kind::None;
  int64_t int_value = 0;     // Int, Bool
  double float_value = 0;    // Float
  std::string text;          // String; Global as "module.name"; Storage key
  std::vector<PyRef> items;  // Tuple, List
  std::vector<std::pair<PyRef, PyRef>> dict;
  DType dtype = DType::F32;    // Storage, Tensor
  int64_t storage_numel = 0;   // Storage
  PyRef storage;               // Tensor
  int64_t storage_offset = 0;  // Tensor, in elements
  Shape shape;                 // Tensor
};

const char* kind_name(PyObject::Kind kind) {
  switch (kind) {
    case PyObject::Kind::None:
      return "None";
    case PyObject::Kind::Bool:
      return "bool";
    case PyObject::Kind::Int:
      return "int";
    case PyObject::Kind::Float:
      return "float";
    case PyObject::Kind::String:
      return "str";
    case PyObject::Kind::Tuple:
      return "tuple";
    case PyObject::Kind::List:
      return "list";
    case PyObject::Kind::Dict:
      return "dict";
    case PyObject::Kind::Global:
      return "global";
    case PyObject::Kind::Storage:
      return "storage";
    case PyObject::Kind::Tensor:
      return "tensor";
  }
  return "?";
}

PyRef make(PyObject::Kind kind) {
  auto obj = std::make_shared<PyObject>();
  obj->kind = kind;
  return obj;
}

PyRef make_int(int64_t value, PyObject::Kind kind = PyObject::Kind::Int) {
  PyRef obj = make(kind);
  obj->int_value = value;
  return obj;
}

std::optional<DType> storage_dtype(const std::string& global) {
  if (global == "torch.HalfStorage") return DType::F16;
  if (global == "torch.BFloat16Storage") return DType::BF16;
  if (global == "torch.FloatStorage") return DType::F32;
  if (global == "torch.IntStorage") return DType::I32;
  if (global == "torch.CharStorage") return DType::I8;
  if (global == "torch.ByteStorage") return DType::U8;
  return std::nullopt;
}

// Interprets the pickle torch.save writes for a state dict. Values are plain data; callables
// (GLOBAL + REDUCE) are limited to the three that such a pickle uses.
class PickleMachine {
 public:
  PickleMachine(const std::byte* data, size_t size, std::string where)
      : data_(data), size_(size), where_(std::move(where)) {}

  PyRef run() {
    while (true) {
      const size_t op_pos = pos_;
      const uint8_t op = next_byte();
      switch (op) {
        case 0x80:  // PROTO
          if (next_byte() > 5) fail(where_, ": pickle protocol above 5 is not supported");
          break;
        case 0x95:  // FRAME: a length hint only
          take(8);
          break;
        case '.':  // STOP
          if (stack_.size() != 1)
            fail(where_, ": pickle stopped with ", stack_.size(), " values on the stack");
          return stack_.back();
        case '(':  // MARK
          marks_.push_back(stack_.size());
          break;
        case '}':  // EMPTY_DICT
          push(make(PyObject::Kind::Dict));
          break;
        case ']':  // EMPTY_LIST
          push(make(PyObject::Kind::List));
          break;
        case ')':  // EMPTY_TUPLE
          push(make(PyObject::Kind::Tuple));
          break;
        case 't':  // TUPLE
          push_sequence(PyObject::Kind::Tuple, pop_to_mark());
          break;
        case 'l':  // LIST
          push_sequence(PyObject::Kind::List, pop_to_mark());
          break;
        case 0x85:  // TUPLE1
        case 0x86:  // TUPLE2
        case 0x87:  // TUPLE3
          push_sequence(PyObject::Kind::Tuple, pop_n(op - 0x85 + 1));
          break;
        case 'd': {  // DICT
          PyRef dict = make(PyObject::Kind::Dict);
          set_items(dict, pop_to_mark());
          push(dict);
          break;
        }
        case 's': {  // SETITEM
          std::vector<PyRef> pair = pop_n(2);
          set_items(top(PyObject::Kind::Dict, "SETITEM"), pair);
          break;
        }
        case 'u': {  // SETITEMS
          std::vector<PyRef> pairs = pop_to_mark();
          set_items(top(PyObject::Kind::Dict, "SETITEMS"), pairs);
          break;
        }
        case 'a': {  // APPEND
          PyRef value = pop();
          top(PyObject::Kind::List, "APPEND")->items.push_back(value);
          break;
        }
        case 'e': {  // APPENDS
          std::vector<PyRef> values = pop_to_mark();
          PyRef list = top(PyObject::Kind::List, "APPENDS");
          list->items.insert(list->items.end(), values.begin(), values.end());
          break;
        }
        case 'X':  // BINUNICODE
          push_string(take_uint(4));
          break;
        case 0x8c:  // SHORT_BINUNICODE
          push_string(take_uint(1));
          break;
        case 0x8d:  // BINUNICODE8
          push_string(take_uint(8));
          break;
        case 'J':  // BININT: signed 32-bit
          push(make_int(static_cast<int32_t>(take_uint(4))));
          break;
        case 'K':  // BININT1
          push(make_int(static_cast<int64_t>(take_uint(1))));
          break;
        case 'M':  // BININT2
          push(make_int(static_cast<int64_t>(take_uint(2))));
          break;
        case 0x8a:  // LONG1: little-endian two's complement of n bytes
          push(make_int(take_long(take_uint(1))));
          break;
        case 'G': {  // BINFLOAT: big-endian double
          uint64_t bits = 0;
          const std::byte* p = take(8);
          for (int i = 0; i < 8; ++i) bits = (bits << 8) | static_cast<uint8_t>(p[i]);
          PyRef value = make(PyObject::Kind::Float);
          value->float_value = std::bit_cast<double>(bits);
          push(value);
          break;
        }
        case 'N':  // NONE
          push(make(PyObject::Kind::None));
          break;
        case 0x88:  // NEWTRUE
          push(make_int(1, PyObject::Kind::Bool));
          break;
        case 0x89:  // NEWFALSE
          push(make_int(0, PyObject::Kind::Bool));
          break;
        case 'c': {  // GLOBAL: "module\nname\n"
          std::string module = take_line();
          push_global(module + "." + take_line());
          break;
        }
        case 0x93: {  // STACK_GLOBAL
          std::vector<PyRef> parts = pop_n(2);
          push_global(expect(parts[0], PyObject::Kind::String, "STACK_GLOBAL module")->text + "." +
                      expect(parts[1], PyObject::Kind::String, "STACK_GLOBAL name")->text);
          break;
        }
        case 'R': {  // REDUCE
          PyRef args = expect(pop(), PyObject::Kind::Tuple, "REDUCE arguments");
          PyRef callable = expect(pop(), PyObject::Kind::Global, "REDUCE callable");
          push(call(callable->text, args->items));
          break;
        }
        case 'b': {  // BUILD: sets object state; for a state dict that is only its `_metadata`
          pop();
          top(PyObject::Kind::Dict, "BUILD");
          break;
        }
        case 'Q':  // BINPERSID
          push(load_storage(pop()));
          break;
        case 'q':  // BINPUT
          memo_[static_cast<uint32_t>(take_uint(1))] = peek();
          break;
        case 'r':  // LONG_BINPUT
          memo_[static_cast<uint32_t>(take_uint(4))] = peek();
          break;
        case 0x94:  // MEMOIZE
          memo_[static_cast<uint32_t>(memo_.size())] = peek();
          break;
        case 'h':  // BINGET
          push(memo_get(take_uint(1)));
          break;
        case 'j':  // LONG_BINGET
          push(memo_get(take_uint(4)));
          break;
        default: {
          const char shown = op >= 0x20 && op < 0x7f ? static_cast<char>(op) : '?';
          char hex[8];
          std::snprintf(hex, sizeof hex, "0x%02x", op);
          fail(where_, ": unsupported pickle opcode ", hex, " ('", shown, "') at offset ", op_pos,
               " of data.pkl; only the opcodes torch.save writes for a state dict are understood");
        }
      }
    }
  }

 private:
  uint8_t next_byte() { return static_cast<uint8_t>(*take(1)); }

  const std::byte* take(size_t n) {
    if (n > size_ - pos_)
      fail(where_, ": data.pkl ends unexpectedly at offset ", pos_, " (truncated pickle)");
    const std::byte* p = data_ + pos_;
    pos_ += n;
    return p;
  }

  uint64_t take_uint(size_t n) {
    const std::byte* p = take(n);
    uint64_t v = 0;
    for (size_t i = n; i-- > 0;) v = (v << 8) | static_cast<uint8_t>(p[i]);
    return v;
  }

  int64_t take_long(size_t n) {
    if (n > 8) fail(where_, ": pickle integer of ", n, " bytes does not fit in 64 bits");
    if (n == 0) return 0;
    uint64_t v = take_uint(n);
    if (n < 8 && (v >> (8 * n - 1)) & 1) v |= ~uint64_t{0} << (8 * n);  // sign-extend
    return static_cast<int64_t>(v);
  }

  std::string take_line() {
    std::string line;
    while (true) {
      const char c = static_cast<char>(*take(1));
      if (c == '\n') return line;
      line.push_back(c);
    }
  }

  void push(PyRef value) { stack_.push_back(std::move(value)); }

  void push_string(uint64_t length) {
    if (length > size_ - pos_)
      fail(where_, ": pickle string of ", length, " bytes runs past the end of data.pkl");
    PyRef value = make(PyObject::Kind::String);
    const std::byte* p = take(static_cast<size_t>(length));
    value->text.assign(reinterpret_cast<const char*>(p), static_cast<size_t>(length));
    push(value);
  }

  void push_global(std::string name) {
    PyRef value = make(PyObject::Kind::Global);
    value->text = std::move(name);
    push(value);
  }

  void push_sequence(PyObject::Kind kind, std::vector<PyRef> items) {
    PyRef value = make(kind);
    value->items = std::move(items);
    push(value);
  }

  PyRef pop() {
    if (stack_.size() <= (marks_.empty() ? 0 : marks_.back())) fail(where_, ": pickle stack underflow");
    PyRef value = std::move(stack_.back());
    stack_.pop_back();
    return value;
  }

  PyRef peek() const {
    if (stack_.empty()) fail(where_, ": pickle memo write with an empty stack");
    return stack_.back();
  }

  std::vector<PyRef> pop_n(size_t n) {
    std::vector<PyRef> values(n);
    for (size_t i = n; i-- > 0;) values[i] = pop();
    return values;
  }

  std::vector<PyRef> pop_to_mark() {
    if (marks_.empty()) fail(where_, ": pickle uses a MARK that was never set");
    std::vector<PyRef> values(std::make_move_iterator(stack_.begin() + marks_.back()),
                              std::make_move_iterator(stack_.end()));
    stack_.resize(marks_.back());
    marks_.pop_back();
    return values;
  }

  PyRef top(PyObject::Kind kind, const char* op) {
    if (stack_.empty()) fail(where_, ": pickle ", op, " with an empty stack");
    return expect(stack_.back(), kind, op);
  }

  PyRef expect(PyRef value, PyObject::Kind kind, const char* what) const {
    if (value->kind != kind) {
      fail(where_, ": pickle ", what, " is a ", kind_name(value->kind), ", expected a ", kind_name(kind));
    }
    return value;
  }

  int64_t expect_int(const PyRef& value, const char* what) const {
    return expect(value, PyObject::Kind::Int, what)->int_value;
  }

  void set_items(const PyRef& dict, const std::vector<PyRef>& pairs) {
    if (pairs.size() % 2 != 0) fail(where_, ": pickle dict items come in an odd count");
    for (size_t i = 0; i < pairs.size(); i += 2) dict->dict.emplace_back(pairs[i], pairs[i + 1]);
  }

  PyRef memo_get(uint64_t index) const {
    const auto it = memo_.find(static_cast<uint32_t>(index));
    if (it == memo_.end()) fail(where_, ": pickle reads memo slot ", index, " that was never written");
    return it->second;
  }

  // persistent_load(('storage', storage_type, key, location, numel)).
  PyRef load_storage(const PyRef& pid) const {
    expect(pid, PyObject::Kind::Tuple, "persistent id");
    if (pid->items.size() != 5 || pid->items[0]->kind != PyObject::Kind::String ||
        pid->items[0]->text != "storage") {
      fail(where_, ": pickle persistent id is not ('storage', type, key, location, numel)");
    }
    const std::string& type = expect(pid->items[1], PyObject::Kind::Global, "storage type")->text;
    const std::optional<DType> dtype = storage_dtype(type);
    if (!dtype)
      fail(where_, ": storage type ", type,
           " is not supported (expected Half, BFloat16, Float, Int, Char or Byte storage)");
    PyRef storage = make(PyObject::Kind::Storage);
    storage->dtype = *dtype;
    storage->text = expect(pid->items[2], PyObject::Kind::String, "storage key")->text;
    storage->storage_numel = expect_int(pid->items[4], "storage size");
    return storage;
  }

  PyRef call(const std::string& callable, const std::vector<PyRef>& args) const {
    if (callable == "collections.OrderedDict") {
      if (!args.empty()) fail(where_, ": pickle calls OrderedDict with arguments");
      return make(PyObject::Kind::Dict);
    }
    if (callable == "torch._utils._rebuild_parameter") {
      // (data, requires_grad, backward_hooks): a Parameter is its data for our purposes.
      if (args.size() != 3) fail(where_, ": _rebuild_parameter takes 3 arguments, got ", args.size());
      return expect(args[0], PyObject::Kind::Tensor, "_rebuild_parameter data");
    }
    if (callable == "torch._utils._rebuild_tensor_v2") {
      // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
      if (args.size() < 6) fail(where_, ": _rebuild_tensor_v2 takes 6 or 7 arguments, got ", args.size());
      PyRef tensor = make(PyObject::Kind::Tensor);
      tensor->storage = expect(args[0], PyObject::Kind::Storage, "_rebuild_tensor_v2 storage");
      tensor->dtype = tensor->storage->dtype;
      tensor->storage_offset = expect_int(args[1], "storage offset");
      Shape stride;
      for (const PyRef& dim : expect(args[2], PyObject::Kind::Tuple, "tensor size")->items) {
        tensor->shape.push_back(expect_int(dim, "tensor size entry"));
      }
      for (const PyRef& step : expect(args[3], PyObject::Kind::Tuple, "tensor stride")->items) {
        stride.push_back(expect_int(step, "tensor stride entry"));
      }
      // Dimensions of size 1 may carry any stride; every other one must match row-major order.
      int64_t expected = 1;
      bool contiguous = stride.size() == tensor->shape.size();
      for (size_t i = tensor->shape.size(); contiguous && i-- > 0;) {
        if (tensor->shape[i] != 1 && stride[i] != expected) contiguous = false;
        expected *= tensor->shape[i];
      }
      if (!contiguous) {
        fail(where_, ": a tensor of size ", shape_str(tensor->shape), " has non-contiguous stride ",
             shape_str(stride), "; save it with .contiguous() (e.g. re-save the state dict)");
      }
      return tensor;
    }
    fail(where_, ": pickle calls ", callable,
         ", which a torch.save state dict does not use (only tensors in a dict are supported)");
  }

  const std::byte* data_;
  size_t size_;
  size_t pos_ = 0;
  std::string where_;
  std::vector<PyRef> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint32_t, PyRef> memo_;
};

}  // namespace

TorchBinFile::TorchBinFile(const std::filesystem::path& path) : file_(MappedFile::open(path)) {
  const std::string where = "torch .bin file " + path.string();
  const ByteReader in(file_->data(), file_->size(), where);
  if (file_->size() >= 4 && in.u32(0, "magic") != kLocalHeaderSig) {
    fail(where,
         ": not a zip archive (the legacy torch.save format of torch < 1.6 is not supported; "
         "re-save with a newer torch or convert to safetensors)");
  }
  const auto entries = read_zip_directory(in, file_->size(), where);

  // Every entry sits under one top-level folder named after the archive; data.pkl names it.
  std::string prefix;
  for (const auto& [name, entry] : entries) {
    if (name.ends_with("/data.pkl") && name.find('/') == name.size() - 9)
      prefix = name.substr(0, name.size() - 8);
  }
  if (prefix.empty()) fail(where, ": zip archive has no <archive>/data.pkl entry (not a torch.save file?)");
  const auto [pickle_begin, pickle_size] =
      stored_entry_span(in, file_->size(), prefix + "data.pkl", entries.at(prefix + "data.pkl"), where);
  PickleMachine machine(file_->data() + pickle_begin, pickle_size, where);
  const PyRef root = machine.run();
  if (root->kind != PyObject::Kind::Dict) {
    fail(where, ": data.pkl holds a ", kind_name(root->kind), ", expected a dict of tensors (a state dict)");
  }

  for (const auto& [key, value] : root->dict) {
    if (key->kind != PyObject::Kind::String) fail(where, ": state dict key is a ", kind_name(key->kind));
    const std::string& name = key->text;
    if (value->kind != PyObject::Kind::Tensor) {
      fail(where, ": state dict entry '", name, "' is a ", kind_name(value->kind), ", expected a tensor");
    }
    const PyObject& storage = *value->storage;
    const std::string entry_name = prefix + "data/" + storage.text;
    const auto entry = entries.find(entry_name);
    if (entry == entries.end())
      fail(where, ": tensor '", name, "' needs zip entry '", entry_name, "', which is missing");
    const auto [begin, size] = stored_entry_span(in, file_->size(), entry_name, entry->second, where);
    const size_t element = dtype_size(storage.dtype);
    if (storage.storage_numel < 0 || static_cast<uint64_t>(storage.storage_numel) * element > size) {
      fail(where, ": tensor '", name, "': storage '", storage.text, "' claims ", storage.storage_numel,
           " elements but its zip entry holds ", size, " bytes");
    }
    const int64_t numel = shape_numel(value->shape);
    if (value->storage_offset < 0 || numel > storage.storage_numel - value->storage_offset) {
      fail(where, ": tensor '", name, "' of size ", shape_str(value->shape), " at storage offset ",
           value->storage_offset, " runs past its storage of ", storage.storage_numel, " elements");
    }
    const std::byte* data = file_->data() + begin + static_cast<size_t>(value->storage_offset) * element;
    HostTensor tensor;
    if (reinterpret_cast<uintptr_t>(data) % element != 0) {
      // torch aligns entries to 64 bytes; other zip writers may not, and typed access must be aligned.
      tensor = HostTensor(storage.dtype, value->shape);
      std::memcpy(tensor.mutable_data(), data, tensor.nbytes());
    } else {
      tensor = HostTensor::view(storage.dtype, value->shape, data, file_);
    }
    if (!tensors_.emplace(name, std::move(tensor)).second) fail(where, ": tensor '", name, "' appears twice");
  }
}

std::vector<std::string> TorchBinFile::names() const {
  std::vector<std::string> out;
  out.reserve(tensors_.size());
  for (const auto& [name, tensor] : tensors_) out.push_back(name);
  return out;
}

bool TorchBinFile::contains(const std::string& name) const { return tensors_.count(name) != 0; }

HostTensor TorchBinFile::get(const std::string& name) const {
  const auto it = tensors_.find(name);
  if (it == tensors_.end()) fail("tensor '", name, "' not found in torch .bin file ", path().string());
  return it->second;
}

std::string TorchBinFile::file_of(const std::string&) const { return path().string(); }

}  // namespace lmd
