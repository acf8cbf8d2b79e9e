// libFuzzer target: the saved-cache loader (serialize.h) on arbitrary bytes.
// Each input is tried twice: as given (the CRCs reject almost every mutation, which is what
// a damaged file looks like) and with every section CRC recomputed, so that the fuzzer also
// reaches the parsing behind the checksums (lengths, config, rotations, layer payloads).
// Any exception other than turboquant::FormatError, a crash, a leak, UB or a hang is a finding.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "turboquant/error.h"
#include "turboquant/kv_cache.h"
#include "turboquant/serialize.h"

namespace {

// Rewrites the CRC of each well-framed section (tag u32 | length u64 | payload | crc u32).
bool fix_crcs(std::vector<uint8_t>& b) {
  bool changed = false;
  size_t pos = 16;  // magic 8 + version 4 + flags 4
  while (pos + 12 <= b.size()) {
    uint64_t len = 0;
    std::memcpy(&len, b.data() + pos + 4, 8);
    if (len > b.size() - pos - 12 || b.size() - pos - 12 - len < 4) break;
    const uint32_t crc = turboquant::crc32c(b.data() + pos, 12 + static_cast<size_t>(len));
    uint8_t* at = b.data() + pos + 12 + len;
    if (std::memcmp(at, &crc, 4) != 0) {
      std::memcpy(at, &crc, 4);
      changed = true;
    }
    pos += 12 + static_cast<size_t>(len) + 4;
  }
  return changed;
}

void load(const uint8_t* data, size_t size) {
  try {
    auto cache = turboquant::deserialize_cache(data, size);
    // A file that loads must round-trip and be usable.
    const auto again = turboquant::serialize_cache(*cache);
    auto reloaded = turboquant::deserialize_cache(again.data(), again.size());
    if (reloaded->size(0) != cache->size(0) || reloaded->memory_bytes() != cache->memory_bytes()) __builtin_trap();
  } catch (const turboquant::FormatError&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  load(data, size);
  std::vector<uint8_t> fixed(data, data + size);
  if (fix_crcs(fixed)) load(fixed.data(), fixed.size());
  return 0;
}
