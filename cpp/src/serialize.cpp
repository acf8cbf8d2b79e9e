#include "turboquant/serialize.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cstring>
#include <functional>
#include <fstream>

#if defined(__x86_64__)
#include <nmmintrin.h>  // _mm_crc32_u64 / _u8 (SSE4.2, used only where the CPU has it)
#endif

#include "turboquant/atomic_file.h"
#include "turboquant/error.h"
#include "turboquant/kv_cache.h"
#include "turboquant/packing.h"
#include "turboquant/rng.h"

namespace turboquant {

static_assert(std::endian::native == std::endian::little,
              "the cache file format is little-endian; add byte swapping for this platform");

namespace {

// Slicing-by-8 tables: t[0] the byte-at-a-time table, t[k][i] the CRC of byte i followed by
// k zero bytes, so that eight bytes take eight lookups and one step.
constexpr std::array<std::array<uint32_t, 256>, 8> make_crc_tables() {
  std::array<std::array<uint32_t, 256>, 8> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1u) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
    t[0][i] = c;
  }
  for (size_t k = 1; k < 8; ++k)
    for (size_t i = 0; i < 256; ++i) t[k][i] = (t[k - 1][i] >> 8) ^ t[0][t[k - 1][i] & 0xFFu];
  return t;
}
constexpr auto kCrcTables = make_crc_tables();

constexpr uint32_t tag(const char (&s)[5]) {
  return static_cast<uint32_t>(static_cast<uint8_t>(s[0])) |
         static_cast<uint32_t>(static_cast<uint8_t>(s[1])) << 8 |
         static_cast<uint32_t>(static_cast<uint8_t>(s[2])) << 16 |
         static_cast<uint32_t>(static_cast<uint8_t>(s[3])) << 24;
}
constexpr uint32_t kTagConf = tag("CONF"), kTagRots = tag("ROTS"), kTagLayer = tag("LAYR"), kTagWindow = tag("WNDW"), kTagSink = tag("SINK"),
                   kTagEnd = tag("END ");
// Version 8's feature sections (serialize.h).
constexpr uint32_t kTagFp16Window = tag("FWIN"), kTagFp16Sinks = tag("FSNK"), kTagDecay = tag("DECY"),
                   kTagEvict = tag("EVCT"), kTagQuantOptions = tag("QOPT"), kTagHeadBits = tag("HBIT"),
                   kTagMixed = tag("MIXD"), kTagKvHeadOffset = tag("KVHO");
constexpr uint32_t kFirstContainerVersion = 8;

// Critical sections (first byte an upper-case letter) must be understood; others may be skipped.
constexpr bool is_critical(uint32_t t) {
  const auto first = static_cast<uint8_t>(t & 0xFFu);
  return first >= 'A' && first <= 'Z';
}

std::string tag_name(uint32_t t) {
  std::string name;
  for (int i = 0; i < 4; ++i) {
    const auto ch = static_cast<uint8_t>(t >> (8 * i));
    if (ch >= 0x20 && ch < 0x7F) {
      name += static_cast<char>(ch);
    } else {
      name += "\\x";
      name += "0123456789abcdef"[ch >> 4];
      name += "0123456789abcdef"[ch & 0xF];
    }
  }
  return name;
}
constexpr size_t kMaxString = 256;

class Writer {
 public:
  std::vector<uint8_t> buf;
  bool checksums = true;  // false: KVCache::copy's bytes in memory (CRC fields left 0)
  template <typename T>
  void put(T v) {
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    buf.insert(buf.end(), p, p + sizeof(T));
  }
  void bytes(const void* p, size_t n) {
    const auto* b = static_cast<const uint8_t*>(p);
    buf.insert(buf.end(), b, b + n);
  }
  void str(const std::string& s) {
    put(static_cast<uint32_t>(s.size()));
    bytes(s.data(), s.size());
  }
  // Sections: begin() reserves tag + length, end() fills the length and appends the CRC.
  size_t begin(uint32_t t) {
    const size_t at = buf.size();
    put(t);
    put(uint64_t{0});
    return at;
  }
  void end(size_t at) {
    const uint64_t len = buf.size() - at - 12;
    std::memcpy(buf.data() + at + 4, &len, 8);
    put(checksums ? crc32c(buf.data() + at, buf.size() - at) : uint32_t{0});
  }
};

class Reader {
 public:
  Reader(const uint8_t* p, size_t n, size_t base = 0, bool checksums = true)
      : p_(p), n_(n), base_(base), checksums_(checksums) {}
  size_t left() const { return n_ - pos_; }
  size_t offset() const { return base_ + pos_; }
  const uint8_t* take(size_t k, const char* what) {
    TQ_CHECK(k <= left(), FormatError, "truncated or corrupted file: ", what, " needs ", k,
             " bytes at offset ", offset(), " but only ", left(), " remain");
    const uint8_t* q = p_ + pos_;
    pos_ += k;
    return q;
  }
  template <typename T>
  T get(const char* what) {
    T v;
    std::memcpy(&v, take(sizeof(T), what), sizeof(T));
    return v;
  }
  std::string str(const char* what) {
    const auto len = get<uint32_t>(what);
    TQ_CHECK(len <= kMaxString, FormatError, "corrupted file: ", what, " length ", len, " at offset ",
             offset(), " exceeds ", kMaxString);
    const auto* s = take(len, what);
    return std::string(reinterpret_cast<const char*>(s), len);
  }
  // The tag of the next section (without consuming it).
  uint32_t peek_tag(const char* what) {
    uint32_t t;
    std::memcpy(&t, take(sizeof(t), what), sizeof(t));
    pos_ -= sizeof(t);
    return t;
  }
  // In a section container (version 8), sections a reader does not know are skipped when
  // ancillary (their CRC still checked) and refused by name when critical.
  void skip_unknown_sections(const char* expected) {
    while (container_) {
      const auto t = peek_tag(expected);
      if (known_tag(t)) return;
      TQ_CHECK(!is_critical(t), FormatError, "this file needs section '", tag_name(t),
               "', which this turboquant does not know (a newer feature): upgrade turboquant");
      section(t, "an ancillary section");
    }
  }
  void set_container(bool on) { container_ = on; }
  static bool known_tag(uint32_t t) {
    for (uint32_t k : {kTagConf, kTagRots, kTagLayer, kTagWindow, kTagSink, kTagEnd, kTagFp16Window,
                       kTagFp16Sinks, kTagDecay, kTagEvict, kTagQuantOptions, kTagHeadBits, kTagMixed,
                       kTagKvHeadOffset})
      if (t == k) return true;
    return false;
  }
  // Reads one section header and verifies its CRC; returns a reader over its payload.
  Reader section(uint32_t expected_tag, const char* name) {
    if (expected_tag != peek_tag(name) && container_) skip_unknown_sections(name);
    const size_t start = pos_;
    const auto t = get<uint32_t>(name);
    TQ_CHECK(t == expected_tag, FormatError, "corrupted file: expected section ", name, " at offset ",
             base_ + start);
    const auto len = get<uint64_t>(name);
    TQ_CHECK(len <= left() && left() - len >= 4, FormatError, "truncated or corrupted file: section ",
             name, " claims ", len, " bytes at offset ", offset(), " but only ", left(), " remain");
    const uint8_t* payload = take(static_cast<size_t>(len), name);
    const auto stored = get<uint32_t>(name);
    if (checksums_) {
      const uint32_t actual = crc32c(p_ + start, 12 + static_cast<size_t>(len));
      TQ_CHECK(stored == actual, FormatError, "corrupted file: CRC32C mismatch in section ", name,
               " at offset ", base_ + start);
    }
    return Reader(payload, static_cast<size_t>(len), base_ + start + 12, checksums_);
  }
  void expect_end(const char* what) {
    TQ_CHECK(left() == 0, FormatError, "corrupted file: ", left(), " unexpected bytes after ", what,
             " at offset ", offset());
  }

 private:
  const uint8_t* p_;
  size_t n_, pos_ = 0, base_;
  bool checksums_;
  bool container_ = false;
};

uint32_t rotation_code(RotationKind k) { return static_cast<uint32_t>(k); }

}  // namespace

namespace detail {

uint32_t crc32c_tables(const void* data, size_t n, uint32_t crc) {
  const auto* p = static_cast<const uint8_t*>(data);
  const auto& t = kCrcTables;
  crc = ~crc;
  for (; n >= 8; n -= 8, p += 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);  // little-endian (asserted above)
    v ^= crc;
    crc = t[7][v & 0xFFu] ^ t[6][(v >> 8) & 0xFFu] ^ t[5][(v >> 16) & 0xFFu] ^ t[4][(v >> 24) & 0xFFu] ^
          t[3][(v >> 32) & 0xFFu] ^ t[2][(v >> 40) & 0xFFu] ^ t[1][(v >> 48) & 0xFFu] ^ t[0][v >> 56];
  }
  for (; n > 0; --n, ++p) crc = t[0][(crc ^ *p) & 0xFFu] ^ (crc >> 8);
  return ~crc;
}

#if defined(__x86_64__)
bool crc32c_hardware_available() {
  static const bool has = __builtin_cpu_supports("sse4.2");
  return has;
}

__attribute__((target("sse4.2"))) uint32_t crc32c_hardware(const void* data, size_t n, uint32_t crc) {
  const auto* p = static_cast<const uint8_t*>(data);
  uint64_t c = ~crc;
  for (; n >= 8; n -= 8, p += 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    c = _mm_crc32_u64(c, v);
  }
  auto c32 = static_cast<uint32_t>(c);
  for (; n > 0; --n, ++p) c32 = _mm_crc32_u8(c32, *p);
  return ~c32;
}
#else
bool crc32c_hardware_available() { return false; }
uint32_t crc32c_hardware(const void* data, size_t n, uint32_t crc) { return crc32c_tables(data, n, crc); }
#endif

}  // namespace detail

uint32_t crc32c(const void* data, size_t n, uint32_t crc) {
  return detail::crc32c_hardware_available() ? detail::crc32c_hardware(data, n, crc)
                                             : detail::crc32c_tables(data, n, crc);
}

namespace {

// CONF's version-1 fields (every version starts with them).
void put_base_config(Writer& w, const KVCache& cache) {
  const KVCacheConfig& c = cache.config();
  w.put(static_cast<uint32_t>(kPackingVersion));
  w.put(static_cast<uint32_t>(kRngSchemeVersion));
  w.put(static_cast<int32_t>(c.head_dim));
  w.put(static_cast<int32_t>(c.n_layers));
  w.put(static_cast<int32_t>(c.n_q_heads));
  w.put(static_cast<int32_t>(c.n_kv_heads));
  w.str(c.key_method);
  w.put(static_cast<int32_t>(c.key_bits));
  w.str(c.value_method);
  w.put(static_cast<int32_t>(c.value_bits));
  w.put(static_cast<uint64_t>(c.seed));
  // The configured rotation kind: resolved ("auto" -> what the quantizers use) for plain
  // quantizers; as configured when there is an outlier split, whose blocks each resolve it
  // (its own kind() is the dense export of the whole block-diagonal map).
  w.put(rotation_code(c.n_outlier_channels > 0 || !c.outlier_channels.empty()
                          ? c.rotation
                          : cache.key_quantizer(0, 0).rotation().kind()));
  w.put(static_cast<int32_t>(c.jl_dim));
  w.put(static_cast<uint64_t>(c.block_tokens));
  w.put(static_cast<uint64_t>(c.max_tokens));
  w.put(static_cast<int32_t>(c.n_outlier_channels));
  w.put(static_cast<int32_t>(c.outlier_bits));
  w.put(static_cast<uint32_t>(c.outlier_channels.size()));
  for (int ch : c.outlier_channels) w.put(static_cast<int32_t>(ch));
}

void put_fp16_window(Writer& w, const KVCacheConfig& c) {
  w.put(static_cast<uint64_t>(c.fp16_window));
  w.put(static_cast<uint32_t>(c.fp16_layers.size()));
  for (int l : c.fp16_layers) w.put(static_cast<int32_t>(l));
}

void put_head_bits(Writer& w, const KVCacheConfig& c) {
  for (const auto* v : {&c.key_head_bits, &c.value_head_bits, &c.outlier_head_bits}) {
    w.put(static_cast<uint32_t>(v->size()));
    for (int b : *v) w.put(static_cast<int32_t>(b));
  }
}

// Versions 1-7: CONF continues with each version's fields (serialize.h).
void put_legacy_config(Writer& w, const KVCacheConfig& c, uint32_t version) {
  if (version >= 2) put_fp16_window(w, c);
  if (version >= 3) {
    w.put(static_cast<uint64_t>(c.fp16_sinks));
    w.put(static_cast<uint64_t>(c.decay_after));
    w.put(static_cast<int32_t>(c.decay_bits));
    w.put(static_cast<uint64_t>(c.max_coded_tokens));
    w.put(static_cast<uint32_t>(c.norm_correction ? 1 : 0));
    w.put(static_cast<uint32_t>(c.outlier_roles));
  }
  if (version >= 4) w.put(static_cast<uint32_t>(c.split_angle_bits));
  if (version >= 5) put_head_bits(w, c);
  if (version >= 7) {
    w.put(static_cast<uint64_t>(c.mixed_group_blocks));
    w.put(static_cast<uint64_t>(c.mixed_keep_blocks));
  }
}

bool has_quantizer_options(const KVCacheConfig& c) {
  return c.has_outliers() || c.norm_correction || c.outlier_roles != OutlierRoles::kBoth;
}

// Version 8: one section per configured feature, after CONF.
void put_feature_sections(Writer& w, const KVCacheConfig& c) {
  size_t at = 0;
  if (c.fp16_window > 0 || !c.fp16_layers.empty()) {
    at = w.begin(kTagFp16Window);
    put_fp16_window(w, c);
    w.end(at);
  }
  if (c.fp16_sinks > 0) {
    at = w.begin(kTagFp16Sinks);
    w.put(static_cast<uint64_t>(c.fp16_sinks));
    w.end(at);
  }
  if (c.low_blocks()) {
    at = w.begin(kTagDecay);
    w.put(static_cast<uint64_t>(c.decay_after));
    w.put(static_cast<int32_t>(c.decay_bits));
    w.end(at);
  }
  if (c.max_coded_tokens > 0) {
    at = w.begin(kTagEvict);
    w.put(static_cast<uint64_t>(c.max_coded_tokens));
    w.end(at);
  }
  if (has_quantizer_options(c)) {
    at = w.begin(kTagQuantOptions);
    w.put(static_cast<uint32_t>(c.norm_correction ? 1 : 0));
    w.put(static_cast<uint32_t>(c.outlier_roles));
    w.put(static_cast<uint32_t>(c.split_angle_bits));
    w.end(at);
  }
  if (c.per_head_bits()) {
    at = w.begin(kTagHeadBits);
    put_head_bits(w, c);
    w.end(at);
  }
  if (c.mixed()) {
    at = w.begin(kTagMixed);
    w.put(static_cast<uint64_t>(c.mixed_group_blocks));
    w.put(static_cast<uint64_t>(c.mixed_keep_blocks));
    w.end(at);
  }
  if (c.kv_head_offset != 0) {  // absent for offset 0: such files are those of before the option
    at = w.begin(kTagKvHeadOffset);
    w.put(static_cast<uint32_t>(c.kv_head_offset));
    w.end(at);
  }
}

}  // namespace

namespace {

// The file's bytes; for_copy (KVCache::copy, bytes that never leave memory): no checksums
// and an empty ROTS section (the copy shares the quantizers).
std::vector<uint8_t> write_cache(const KVCache& cache, bool legacy, bool for_copy) {
  const KVCacheConfig& c = cache.config();
  Writer w;
  w.checksums = !for_copy;
  w.bytes(kCacheMagic, sizeof(kCacheMagic));
  const bool windowed = c.windowed();
  // A legacy file is the oldest version that expresses the cache (serialize.h), so older
  // readers still load what they can; otherwise the section container.
  const uint32_t version = legacy ? c.format_version() : kCacheFormatVersion;
  // Versions 1-7 have no field for it: a reader of those would give the heads the streams of
  // the model's first heads, i.e. other codes.
  TQ_CHECK(!legacy || c.kv_head_offset == 0, NotSupported, "a cache with kv_head_offset ",
           c.kv_head_offset, " needs the section container (version ", kCacheFormatVersion,
           "); the legacy versions 1-7 cannot record a KV head offset");
  w.put(version);
  w.put(uint32_t{0});

  size_t at = w.begin(kTagConf);
  put_base_config(w, cache);
  if (legacy) put_legacy_config(w, c, version);
  w.end(at);
  if (!legacy) put_feature_sections(w, c);

  at = w.begin(kTagRots);
  for (int l = 0; l < (for_copy ? 0 : c.n_layers); ++l) {
    for (int h = 0; h < c.n_kv_heads; ++h) {
      for (const Quantizer* q : {&cache.key_quantizer(l, h), &cache.value_quantizer(l, h)}) {
        const auto p = q->rotation().parameters();
        w.put(rotation_code(q->rotation().kind()));
        w.put(static_cast<uint64_t>(p.size()));
        w.bytes(p.data(), p.size() * sizeof(float));
      }
    }
  }
  w.end(at);

  std::vector<uint8_t> codes, norms;
  for (int l = 0; l < c.n_layers; ++l) {
    if (c.fp16_sinks > 0) {
      at = w.begin(kTagSink);
      w.put(static_cast<uint32_t>(l));
      w.put(static_cast<uint64_t>(cache.sink_tokens(l)));
      for (int h = 0; h < c.n_kv_heads; ++h)
        for (KVRole role : {KVRole::kKey, KVRole::kValue}) {
          const auto& rows = cache.sinks(l, h, role);
          w.bytes(rows.data(), rows.size() * sizeof(uint16_t));
        }
      w.end(at);
    }
    at = w.begin(kTagLayer);
    const size_t n = cache.code_tokens(l);
    w.put(static_cast<uint32_t>(l));
    w.put(static_cast<uint64_t>(n));
    if (version >= 3) w.put(static_cast<uint64_t>(cache.evicted_tokens(l)));
    const size_t nblocks = (n + c.block_tokens - 1) / c.block_tokens;
    if (c.low_blocks()) {
      for (int h = 0; h < c.n_kv_heads; ++h)
        for (KVRole role : {KVRole::kKey, KVRole::kValue}) {
          const PagedCodes& p = cache.pages(l, h, role);
          for (size_t b = 0; b < nblocks; ++b) w.put(static_cast<uint8_t>(p.is_decayed(b) ? 1 : 0));
        }
    }
    if (c.mixed())
      for (int h = 0; h < c.n_kv_heads; ++h) {
        const auto& m = cache.mixed_masks(l, h);
        w.bytes(m.data(), m.size() * sizeof(uint64_t));
      }
    for (int h = 0; h < c.n_kv_heads; ++h) {
      for (KVRole role : {KVRole::kKey, KVRole::kValue}) {
        const Quantizer& q = role == KVRole::kKey ? cache.key_quantizer(l, h) : cache.value_quantizer(l, h);
        size_t cbytes = 0;
        for (size_t b = 0; b < nblocks; ++b)
          cbytes += std::min(c.block_tokens, n - b * c.block_tokens) *
                    cache.block_quantizer(l, h, role, b * c.block_tokens).code_bytes();
        codes.resize(cbytes);
        norms.resize(n * q.norm_bytes());
        cache.copy_out(l, h, role, 0, n, codes.data(), norms.data());
        w.bytes(codes.data(), codes.size());
        w.bytes(norms.data(), norms.size());
      }
    }
    w.end(at);
    if (windowed) {
      at = w.begin(kTagWindow);
      w.put(static_cast<uint32_t>(l));
      w.put(static_cast<uint64_t>(cache.window_tokens(l)));
      for (int h = 0; h < c.n_kv_heads; ++h)
        for (KVRole role : {KVRole::kKey, KVRole::kValue}) {
          const auto& rows = cache.window(l, h, role);
          w.bytes(rows.data(), rows.size() * sizeof(uint16_t));
        }
      if (c.mixed()) {
        for (int h = 0; h < c.n_kv_heads; ++h) {
          const auto imp = cache.window_importance(l, h);
          w.bytes(imp.data(), imp.size() * sizeof(float));
        }
        w.put(static_cast<uint64_t>(cache.rated_tokens(l)));
      }
      w.end(at);
    }
  }
  w.end(w.begin(kTagEnd));
  return std::move(w.buf);
}

}  // namespace

std::vector<uint8_t> serialize_cache(const KVCache& cache, bool legacy) { return write_cache(cache, legacy, false); }

namespace {

// CONF's version-1 fields into c.
void read_base_config(Reader& conf, KVCacheConfig& c) {
  const auto packing = conf.get<uint32_t>("packing version");
  const auto scheme = conf.get<uint32_t>("rng scheme version");
  TQ_CHECK(packing == static_cast<uint32_t>(kPackingVersion), FormatError, "file uses packing layout v",
           packing, ", this library has v", kPackingVersion);
  TQ_CHECK(scheme == static_cast<uint32_t>(kRngSchemeVersion), FormatError, "file uses rng scheme v",
           scheme, ", this library has v", kRngSchemeVersion);
  c.head_dim = conf.get<int32_t>("head_dim");
  c.n_layers = conf.get<int32_t>("n_layers");
  c.n_q_heads = conf.get<int32_t>("n_q_heads");
  c.n_kv_heads = conf.get<int32_t>("n_kv_heads");
  c.key_method = conf.str("key_method");
  c.key_bits = conf.get<int32_t>("key_bits");
  c.value_method = conf.str("value_method");
  c.value_bits = conf.get<int32_t>("value_bits");
  c.seed = conf.get<uint64_t>("seed");
  const auto rot = conf.get<uint32_t>("rotation");
  TQ_CHECK(rot == rotation_code(RotationKind::kDense) || rot == rotation_code(RotationKind::kHadamard) ||
               rot == rotation_code(RotationKind::kHadamard1) || rot == rotation_code(RotationKind::kAuto),
           FormatError, "corrupted file: rotation kind ", rot);
  c.rotation = static_cast<RotationKind>(rot);
  c.jl_dim = conf.get<int32_t>("jl_dim");
  c.block_tokens = static_cast<size_t>(conf.get<uint64_t>("block_tokens"));
  c.max_tokens = static_cast<size_t>(conf.get<uint64_t>("max_tokens"));
  c.n_outlier_channels = conf.get<int32_t>("n_outlier_channels");
  c.outlier_bits = conf.get<int32_t>("outlier_bits");
  const auto n_channels = conf.get<uint32_t>("outlier channel count");
  TQ_CHECK(n_channels <= static_cast<uint32_t>(kMaxDim), FormatError,
           "corrupted file: outlier channel count ", n_channels);
  for (uint32_t i = 0; i < n_channels; ++i) c.outlier_channels.push_back(conf.get<int32_t>("outlier channel"));
}

// Versions 1-7: the rest of CONF (serialize.h), checked against the version that wrote it.
void read_legacy_config(Reader& conf, KVCacheConfig& c, uint32_t version) {
  if (version >= 2) {
    c.fp16_window = static_cast<size_t>(conf.get<uint64_t>("fp16_window"));
    const auto n_fp16 = conf.get<uint32_t>("fp16 layer count");
    TQ_CHECK(n_fp16 <= conf.left() / sizeof(int32_t), FormatError, "corrupted file: fp16 layer count ", n_fp16);
    for (uint32_t i = 0; i < n_fp16; ++i) c.fp16_layers.push_back(conf.get<int32_t>("fp16 layer"));
    TQ_CHECK(version >= 3 || c.windowed(), FormatError, "corrupted file: version 2 without an fp16 window");
  }
  if (version >= 3) {
    c.fp16_sinks = static_cast<size_t>(conf.get<uint64_t>("fp16_sinks"));
    c.decay_after = static_cast<size_t>(conf.get<uint64_t>("decay_after"));
    c.decay_bits = conf.get<int32_t>("decay_bits");
    c.max_coded_tokens = static_cast<size_t>(conf.get<uint64_t>("max_coded_tokens"));
    const auto nc = conf.get<uint32_t>("norm_correction");
    TQ_CHECK(nc <= 1, FormatError, "corrupted file: norm_correction flag ", nc);
    c.norm_correction = nc == 1;
    const auto roles = conf.get<uint32_t>("outlier_roles");
    TQ_CHECK(roles <= 2, FormatError, "corrupted file: outlier_roles ", roles);
    c.outlier_roles = static_cast<OutlierRoles>(roles);
    TQ_CHECK(version > 3 || c.v3(), FormatError, "corrupted file: version 3 without a version-3 option");
  }
  if (version >= 4) {
    const auto angle = conf.get<uint32_t>("split_angle_bits");
    TQ_CHECK(angle == 8 || angle == 16, FormatError, "corrupted file: split_angle_bits ", angle,
             " (must be 8 or 16)");
    c.split_angle_bits = static_cast<int>(angle);
    TQ_CHECK(version > 4 || c.v4(), FormatError, "corrupted file: version 4 without a version-4 option");
  } else if (c.has_outliers()) {
    c.split_angle_bits = 16;  // the only width before version 4
  }
  if (version >= 5) {
    const char* names[3] = {"key_head_bits", "value_head_bits", "outlier_head_bits"};
    std::vector<int>* lists[3] = {&c.key_head_bits, &c.value_head_bits, &c.outlier_head_bits};
    for (int i = 0; i < 3; ++i) {
      const auto count = conf.get<uint32_t>(names[i]);
      const auto per_layer = static_cast<uint32_t>(c.n_layers) * static_cast<uint32_t>(c.n_kv_heads);
      TQ_CHECK(count == 0 || count == static_cast<uint32_t>(c.n_kv_heads) || (version >= 6 && count == per_layer),
               FormatError, "corrupted file: ", names[i], " has ", count, " entries (must be 0 or n_kv_heads = ",
               c.n_kv_heads, version >= 6 ? " or n_layers * n_kv_heads" : "", ")");
      for (uint32_t h = 0; h < count; ++h) lists[i]->push_back(conf.get<int32_t>(names[i]));
    }
    TQ_CHECK(version >= 7 || c.per_head_bits(), FormatError, "corrupted file: version ", version,
             " without per-head bit widths");
    TQ_CHECK(version != 6 || c.per_layer_head_bits(), FormatError,
             "corrupted file: version 6 without per-layer, per-head bit widths");
  }
  if (version >= 7) {
    c.mixed_group_blocks = static_cast<size_t>(conf.get<uint64_t>("mixed_group_blocks"));
    c.mixed_keep_blocks = static_cast<size_t>(conf.get<uint64_t>("mixed_keep_blocks"));
    TQ_CHECK(c.mixed(), FormatError, "corrupted file: version 7 without mixed precision");
  }
}

// Version 8: the feature sections between CONF and ROTS (each at most once).
void read_feature_sections(Reader& r, KVCacheConfig& c) {
  std::vector<uint32_t> seen;
  c.split_angle_bits = KVCacheConfig{}.split_angle_bits;
  for (;;) {
    r.skip_unknown_sections("a section after CONF");
    const auto t = r.peek_tag("a section after CONF");
    if (t == kTagRots) return;
    TQ_CHECK(std::find(seen.begin(), seen.end(), t) == seen.end(), FormatError, "corrupted file: section ",
             tag_name(t), " appears twice");
    seen.push_back(t);
    const std::string name = tag_name(t);
    Reader sec = r.section(t, name.c_str());
    if (t == kTagFp16Window) {
      c.fp16_window = static_cast<size_t>(sec.get<uint64_t>("fp16_window"));
      const auto n_fp16 = sec.get<uint32_t>("fp16 layer count");
      TQ_CHECK(n_fp16 <= sec.left() / sizeof(int32_t), FormatError, "corrupted file: fp16 layer count ", n_fp16);
      for (uint32_t i = 0; i < n_fp16; ++i) c.fp16_layers.push_back(sec.get<int32_t>("fp16 layer"));
      TQ_CHECK(c.fp16_window > 0 || !c.fp16_layers.empty(), FormatError, "corrupted file: an empty FWIN section");
    } else if (t == kTagFp16Sinks) {
      c.fp16_sinks = static_cast<size_t>(sec.get<uint64_t>("fp16_sinks"));
      TQ_CHECK(c.fp16_sinks > 0, FormatError, "corrupted file: FSNK section of 0 sinks");
    } else if (t == kTagDecay) {
      c.decay_after = static_cast<size_t>(sec.get<uint64_t>("decay_after"));
      c.decay_bits = sec.get<int32_t>("decay_bits");
    } else if (t == kTagEvict) {
      c.max_coded_tokens = static_cast<size_t>(sec.get<uint64_t>("max_coded_tokens"));
      TQ_CHECK(c.max_coded_tokens > 0, FormatError, "corrupted file: EVCT section of 0 tokens");
    } else if (t == kTagQuantOptions) {
      const auto nc = sec.get<uint32_t>("norm_correction");
      TQ_CHECK(nc <= 1, FormatError, "corrupted file: norm_correction flag ", nc);
      c.norm_correction = nc == 1;
      const auto roles = sec.get<uint32_t>("outlier_roles");
      TQ_CHECK(roles <= 2, FormatError, "corrupted file: outlier_roles ", roles);
      c.outlier_roles = static_cast<OutlierRoles>(roles);
      const auto angle = sec.get<uint32_t>("split_angle_bits");
      TQ_CHECK(angle == 8 || angle == 16, FormatError, "corrupted file: split_angle_bits ", angle,
               " (must be 8 or 16)");
      c.split_angle_bits = static_cast<int>(angle);
    } else if (t == kTagHeadBits) {
      const char* names[3] = {"key_head_bits", "value_head_bits", "outlier_head_bits"};
      std::vector<int>* lists[3] = {&c.key_head_bits, &c.value_head_bits, &c.outlier_head_bits};
      const auto per_layer = static_cast<uint32_t>(c.n_layers) * static_cast<uint32_t>(c.n_kv_heads);
      for (int i = 0; i < 3; ++i) {
        const auto count = sec.get<uint32_t>(names[i]);
        TQ_CHECK(count == 0 || count == static_cast<uint32_t>(c.n_kv_heads) || count == per_layer, FormatError,
                 "corrupted file: ", names[i], " has ", count, " entries (must be 0, n_kv_heads = ",
                 c.n_kv_heads, " or n_layers * n_kv_heads)");
        for (uint32_t h = 0; h < count; ++h) lists[i]->push_back(sec.get<int32_t>(names[i]));
      }
      TQ_CHECK(c.per_head_bits(), FormatError, "corrupted file: an empty HBIT section");
    } else if (t == kTagMixed) {
      c.mixed_group_blocks = static_cast<size_t>(sec.get<uint64_t>("mixed_group_blocks"));
      c.mixed_keep_blocks = static_cast<size_t>(sec.get<uint64_t>("mixed_keep_blocks"));
      TQ_CHECK(c.mixed(), FormatError, "corrupted file: MIXD section without mixed precision");
    } else if (t == kTagKvHeadOffset) {
      const auto offset = sec.get<uint32_t>("kv_head_offset");
      TQ_CHECK(offset >= 1 && offset < (1u << 16), FormatError, "corrupted file: KVHO section of kv_head_offset ",
               offset, " (must be in [1, 65535])");
      c.kv_head_offset = static_cast<int>(offset);
    } else {
      TQ_CHECK(false, FormatError, "corrupted file: section ", name, " where a feature section or ROTS was expected");
    }
    sec.expect_end(name.c_str());
  }
}

}  // namespace

namespace {

// The cache of a file's bytes. make builds the empty cache of the file's configuration;
// with rotations_given (KVCache::copy: the bytes are a copy's own, its quantizers shared)
// the ROTS section is read through but its rotations are not set.
std::unique_ptr<KVCache> load_cache(const uint8_t* data, size_t size,
                                    const std::function<std::unique_ptr<KVCache>(const KVCacheConfig&)>& make,
                                    bool rotations_given) {
  Reader r(data, size, 0, !rotations_given);
  const uint8_t* magic = r.take(sizeof(kCacheMagic), "magic");
  TQ_CHECK(std::memcmp(magic, kCacheMagic, sizeof(kCacheMagic)) == 0, FormatError,
           "not a turboquant cache file (bad magic)");
  const auto version = r.get<uint32_t>("format version");
  TQ_CHECK(version != 0, FormatError, "corrupted file: format version 0");
  TQ_CHECK(version <= kCacheFormatVersion, FormatError, "cache file format version ", version,
           " is newer than this library supports (", kCacheFormatVersion, "); upgrade turboquant");
  const auto flags = r.get<uint32_t>("flags");
  TQ_CHECK(flags == 0, FormatError, "corrupted file: unknown flags ", flags);
  try {
    Reader conf = r.section(kTagConf, "CONF");
    KVCacheConfig c;
    read_base_config(conf, c);
    const bool container = version >= kFirstContainerVersion;
    if (!container) read_legacy_config(conf, c, version);
    conf.expect_end("CONF");
    r.set_container(container);
    if (container) read_feature_sections(r, c);
    const bool windowed = version == 2 || (version >= 3 && c.windowed());
    c.validate();
    // Before building anything sized by the header: the ROTS section must hold at least the
    // smallest possible rotation of every stream, so a few corrupted header bytes cannot make
    // the loader construct (and seed rotations for) a million streams.
    Reader rots = r.section(kTagRots, "ROTS");
    const size_t streams_total = static_cast<size_t>(c.n_layers) * static_cast<size_t>(c.n_kv_heads) * 2;
    const auto d = static_cast<size_t>(c.head_dim);
    // The smallest rotation: hadamard1's d signs (d = 1: a 1×1 dense matrix).
    const size_t min_stream_bytes = 4 + 8 + sizeof(float) * d;
    TQ_CHECK(rotations_given || rots.left() / min_stream_bytes >= streams_total, FormatError, "corrupted file: ROTS section of ",
             rots.left(), " bytes cannot hold the rotations of ", streams_total, " streams (",
             c.n_layers, " layers × ", c.n_kv_heads, " KV heads × key/value)");
    auto cache = make(c);

    for (int l = 0; l < (rotations_given ? 0 : c.n_layers); ++l) {
      for (int h = 0; h < c.n_kv_heads; ++h) {
        for (KVRole role : {KVRole::kKey, KVRole::kValue}) {
          const auto kind = rots.get<uint32_t>("rotation kind");
          TQ_CHECK(kind == rotation_code(RotationKind::kDense) || kind == rotation_code(RotationKind::kHadamard) ||
                       kind == rotation_code(RotationKind::kHadamard1),
                   FormatError, "corrupted file: rotation kind ", kind);
          const auto count = rots.get<uint64_t>("rotation size");
          TQ_CHECK(count <= rots.left() / sizeof(float), FormatError, "corrupted file: rotation of ", count,
                   " floats exceeds its section");
          const uint8_t* p = rots.take(static_cast<size_t>(count) * sizeof(float), "rotation");
          std::vector<float> params(static_cast<size_t>(count));
          if (!params.empty()) std::memcpy(params.data(), p, params.size() * sizeof(float));
          cache->set_rotation(l, h, role,
                              Rotation::from_parameters(static_cast<RotationKind>(kind), c.head_dim, params));
        }
      }
    }
    rots.expect_end("ROTS");

    const size_t streams = static_cast<size_t>(c.n_kv_heads) * 2;
    const auto d16 = [&](Reader& sec, const char* what, size_t tokens) {
      std::vector<std::vector<uint16_t>> rows(streams);
      for (size_t s = 0; s < streams; ++s) {
        rows[s].resize(tokens * static_cast<size_t>(c.head_dim));
        const uint8_t* src = sec.take(rows[s].size() * sizeof(uint16_t), what);
        if (!rows[s].empty()) std::memcpy(rows[s].data(), src, rows[s].size() * sizeof(uint16_t));
      }
      return rows;
    };
    for (int l = 0; l < c.n_layers; ++l) {
      if (version >= 3 && c.fp16_sinks > 0) {
        Reader sk = r.section(kTagSink, "SINK");
        const auto sl = sk.get<uint32_t>("sink layer index");
        TQ_CHECK(sl == static_cast<uint32_t>(l), FormatError, "corrupted file: sinks of layer ", sl, " where ", l,
                 " was expected");
        const auto sn = sk.get<uint64_t>("sink token count");
        const size_t srow = streams * static_cast<size_t>(c.head_dim) * sizeof(uint16_t);
        TQ_CHECK(sn <= sk.left() && sn * srow == sk.left(), FormatError, "corrupted file: sinks of layer ", l,
                 " claim ", sn, " tokens but hold ", sk.left(), " bytes (", srow, " per token)");
        const auto rows = d16(sk, "sink rows", static_cast<size_t>(sn));
        sk.expect_end("SINK");
        std::vector<const uint16_t*> ptrs(streams);
        for (size_t s = 0; s < streams; ++s) ptrs[s] = rows[s].data();
        cache->append_sinks(l, static_cast<size_t>(sn), ptrs);
      }
      Reader lay = r.section(kTagLayer, "LAYR");
      const auto li = lay.get<uint32_t>("layer index");
      TQ_CHECK(li == static_cast<uint32_t>(l), FormatError, "corrupted file: layer ", li, " where ", l,
               " was expected");
      const auto n = lay.get<uint64_t>("token count");
      if (version >= 3) cache->set_evicted_tokens(l, static_cast<size_t>(lay.get<uint64_t>("evicted token count")));
      size_t row = 0;
      for (int h = 0; h < c.n_kv_heads; ++h)
        row += cache->key_quantizer(l, h).bytes_per_vector() + cache->value_quantizer(l, h).bytes_per_vector();
      TQ_CHECK(n <= lay.left() && (c.low_blocks() || n * row == lay.left()), FormatError, "corrupted file: layer ", l,
               " claims ", n, " tokens but holds ", lay.left(), " bytes (", row, " per token)");
      const size_t bt = c.block_tokens;
      const size_t nblocks = (static_cast<size_t>(n) + bt - 1) / bt;
      std::vector<const uint8_t*> codes(streams), norms(streams), bflags(streams);
      std::vector<std::vector<uint64_t>> mask_rows;
      std::vector<const uint64_t*> masks;
      if (c.low_blocks()) {
        TQ_CHECK(nblocks <= lay.left() / streams, FormatError, "corrupted file: layer ", l, " claims ", n,
                 " tokens but holds only ", lay.left(), " bytes");
        for (size_t s = 0; s < streams; ++s) bflags[s] = lay.take(nblocks, "decay bflags");
        for (size_t s = 0; s < streams; ++s)
          for (size_t b = 0; b < nblocks; ++b)
            TQ_CHECK(bflags[s][b] <= 1, FormatError, "corrupted file: decay flag ", static_cast<int>(bflags[s][b]),
                     " of layer ", l, " stream ", s, " block ", b, " (must be 0 or 1)");
      }
      if (c.mixed()) {
        const size_t F = c.mixed_group_tokens(), words = cache->mixed_mask_words();
        TQ_CHECK(n % F == 0, FormatError, "corrupted file: layer ", l, " holds ", n,
                 " coded tokens, not whole mixed-precision groups of ", F);
        const size_t count = static_cast<size_t>(n) / F * words;
        TQ_CHECK(count <= lay.left() / sizeof(uint64_t) / static_cast<size_t>(c.n_kv_heads), FormatError,
                 "corrupted file: layer ", l, " is too short for its mixed-precision masks");
        for (int h = 0; h < c.n_kv_heads; ++h) {
          mask_rows.emplace_back(count);
          const uint8_t* src = lay.take(count * sizeof(uint64_t), "mixed masks");
          if (count > 0) std::memcpy(mask_rows.back().data(), src, count * sizeof(uint64_t));
        }
        for (const auto& m : mask_rows) masks.push_back(m.data());
      }
      for (int h = 0; h < c.n_kv_heads; ++h) {
        for (KVRole role : {KVRole::kKey, KVRole::kValue}) {
          const Quantizer& q = role == KVRole::kKey ? cache->key_quantizer(l, h) : cache->value_quantizer(l, h);
          const size_t s = static_cast<size_t>(h) * 2 + static_cast<size_t>(role);
          size_t cbytes = static_cast<size_t>(n) * q.code_bytes();
          if (c.low_blocks()) {
            const size_t dcb = cache->head_codes(l, h, role).decayed->code_bytes();
            cbytes = 0;
            for (size_t b = 0; b < nblocks; ++b)
              cbytes += std::min(bt, static_cast<size_t>(n) - b * bt) * (bflags[s][b] ? dcb : q.code_bytes());
          }
          codes[s] = lay.take(cbytes, "codes");
          norms[s] = lay.take(static_cast<size_t>(n) * q.norm_bytes(), "norms");
        }
      }
      lay.expect_end("LAYR");
      cache->append_encoded(l, static_cast<size_t>(n), codes, norms, c.low_blocks() ? &bflags : nullptr,
                            c.mixed() ? &masks : nullptr);
      if (windowed) {
        Reader win = r.section(kTagWindow, "WNDW");
        const auto wl = win.get<uint32_t>("window layer index");
        TQ_CHECK(wl == static_cast<uint32_t>(l), FormatError, "corrupted file: window of layer ", wl, " where ",
                 l, " was expected");
        const auto wn = win.get<uint64_t>("window token count");
        const size_t wrow = streams * static_cast<size_t>(c.head_dim) * sizeof(uint16_t) +
                            (c.mixed() ? static_cast<size_t>(c.n_kv_heads) * sizeof(float) : 0);
        const size_t wtail = c.mixed() ? sizeof(uint64_t) : 0;  // mixed: the rated token count
        TQ_CHECK(win.left() >= wtail && wn <= win.left() && wn * wrow == win.left() - wtail, FormatError,
                 "corrupted file: window of layer ", l,
                 " claims ", wn, " tokens but holds ", win.left(), " bytes (", wrow, " per token)");
        const auto rows = d16(win, "window rows", static_cast<size_t>(wn));
        std::vector<const uint16_t*> ptrs(streams);
        for (size_t s = 0; s < streams; ++s) ptrs[s] = rows[s].data();
        std::vector<std::vector<float>> imp;
        std::vector<const float*> imp_ptrs;
        if (c.mixed()) {
          for (int h = 0; h < c.n_kv_heads; ++h) {
            imp.emplace_back(static_cast<size_t>(wn));
            const uint8_t* src = win.take(imp.back().size() * sizeof(float), "window importance");
            if (wn > 0) std::memcpy(imp.back().data(), src, imp.back().size() * sizeof(float));
          }
          for (const auto& v : imp) imp_ptrs.push_back(v.data());
        }
        const uint64_t rated = c.mixed() ? win.get<uint64_t>("rated token count") : 0;
        win.expect_end("WNDW");
        cache->append_window(l, static_cast<size_t>(wn), ptrs, c.mixed() ? &imp_ptrs : nullptr);
        TQ_CHECK(rated <= cache->size(l), FormatError, "corrupted file: layer ", l, " has ", rated,
                 " rated tokens but holds ", cache->size(l));
        cache->set_rated_tokens(l, static_cast<size_t>(rated));
      }
    }
    r.section(kTagEnd, "END").expect_end("END");
    r.expect_end("the END section");
    return cache;
  } catch (const InvalidArgument& e) {
    throw FormatError(std::string("invalid cache file: ") + e.what());
  } catch (const NotSupported& e) {  // e.g. decay of a method that cannot decay: never written
    throw FormatError(std::string("invalid cache file: ") + e.what());
  }
}

}  // namespace

std::unique_ptr<KVCache> deserialize_cache(const uint8_t* data, size_t size) {
  return load_cache(data, size, [](const KVCacheConfig& c) { return std::make_unique<KVCache>(c); }, false);
}

std::unique_ptr<KVCache> KVCache::copy() const {
  const auto bytes = write_cache(*this, false, true);
  return load_cache(
      bytes.data(), bytes.size(),
      [this](const KVCacheConfig& c) { return std::unique_ptr<KVCache>(new KVCache(c, table_)); }, true);
}

void KVCache::save(const std::string& path, bool legacy) const {
  const auto bytes = serialize_cache(*this, legacy);
  write_file_atomic(path, bytes.data(), bytes.size());  // a killed save never leaves a prefix
}

std::unique_ptr<KVCache> KVCache::load(const std::string& path) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  TQ_CHECK(f.good(), InvalidArgument, "cannot open '", path, "' for reading");
  const std::streamsize size = f.tellg();
  TQ_CHECK(size >= 0, InvalidArgument, "cannot read '", path, "'");
  std::vector<uint8_t> bytes(static_cast<size_t>(size));
  f.seekg(0);
  f.read(reinterpret_cast<char*>(bytes.data()), size);
  TQ_CHECK(f.good() || f.eof(), InvalidArgument, "reading '", path, "' failed");
  return deserialize_cache(bytes.data(), bytes.size());
}

}  // namespace turboquant
