// The saved-cache file format (DESIGN §3 "Serialization"): the one definition. All integers
// little-endian; floats IEEE 754 binary32; norms as stored (fp16 bits).
//
//   magic    8 bytes  "TQKVCACH"
//   version  u32      kCacheFormatVersion (a newer version is refused, never guessed at)
//   flags    u32      0 (reserved)
//   then sections, each:  tag u32 | length u64 | payload (length bytes) | crc u32
//     crc = CRC32C over tag, length and payload, so a damaged length is caught too.
//   "CONF" (once, first): packing version u32, rng scheme version u32, head_dim i32,
//          n_layers i32, n_q_heads i32, n_kv_heads i32, key_method str, key_bits i32,
//          value_method str, value_bits i32, seed u64, rotation u32 (resolved kind),
//          jl_dim i32, block_tokens u64, max_tokens u64    (str = u32 length + bytes)
//   "ROTS" (once): for each stream s = (layer*n_kv_heads + head)*2 + role (0 key, 1 value):
//          kind u32, count u64, count floats (Rotation::parameters())
//   "LAYR" (n_layers times, in order): layer u32, tokens u64, then for each stream of the
//          layer (head*2 + role): codes (tokens × code_bytes), norms (tokens × norm_bytes)
//   Version 2 (written only by caches with an fp16 window, KVCacheConfig::windowed()):
//   CONF continues with fp16_window u64, fp16_layers count u32 + count i32; LAYR holds the
//   coded tokens only, and each LAYR is followed by "WNDW": layer u32, tokens u64, then for
//   each stream of the layer (head*2 + role) tokens × head_dim fp16 rows. Version 1 files
//   (no window) are written as before.
//   Version 3 (written only with fp16 sinks, temporal decay or eviction, KVCacheConfig::v3()):
//   CONF always continues with the version 2 fields, then fp16_sinks u64, decay_after u64,
//   decay_bits i32, max_coded_tokens u64. With fp16_sinks > 0 each layer starts with "SINK":
//   layer u32, tokens u64, then per stream (head*2 + role) tokens × head_dim fp16 rows.
//   LAYR: layer u32, tokens u64 (the code tokens, after the sinks), evicted u64; with decay
//   then one u8 flag (0/1) per block for every stream (stream-major); then codes and norms
//   per stream as before, a flagged block's rows having the decay_bits code_bytes. WNDW
//   follows LAYR only when windowed().
//   Version 4 (written only for an outlier split with 8-bit part angles, KVCacheConfig::v4()):
//   CONF continues with the version 2 and 3 fields, then split_angle_bits u32 (8 or 16).
//   Versions 1-3 imply 16-bit angles: an outlier-split file of those versions loads with
//   split_angle_bits = 16 and is written back unchanged.
//   Version 5 (written only with per-KV-head bit widths, KVCacheConfig::per_head_bits()):
//   CONF continues with the version 2-4 fields, then key_head_bits, value_head_bits and
//   outlier_head_bits, each a count u32 (0 or n_kv_heads) + count i32. Every stream's code
//   rows (LAYR) have that stream's own code_bytes. Files of versions 1-4 load and are written
//   back unchanged.
//   Version 6 (written only when a per-head list has one entry per layer and KV head of a
//   cache of several layers, KVCacheConfig::per_layer_head_bits()): as version 5, a count
//   may also be n_layers * n_kv_heads (layer-major). Files of versions 1-5 load and are
//   written back unchanged.
//   Version 7 (written only with mixed precision, KVCacheConfig::mixed()): CONF continues
//   with the version 2-5 fields, then mixed_group_blocks u64 and mixed_keep_blocks u64. LAYR
//   holds whole groups; after the block flags (written whenever blocks may hold decay_bits
//   codes) come the groups' masks, per KV head (code tokens / group tokens) × ceil(group
//   tokens / 64) u64 words (KVCache::mixed_masks); the codes are in the cache's storage
//   order. WNDW ends with the window tokens' importance, per KV head tokens × f32, and the
//   layer's rated token count u64 (KVCache::rated_tokens).
//   "END " (last): empty payload; nothing may follow it.
//
//   Version 8, the section container (what save() writes): a feature adds a section, not a
//   version. A tag whose first byte is an upper-case letter is critical: a reader that does
//   not know it refuses the file, naming the tag; any other tag is ancillary, and a reader
//   that does not know it skips it (wherever it stands). CONF holds the version-1 fields
//   only; after it, before ROTS, each configured feature has its own section (each at most
//   once, in any order; absent = the feature is off):
//     "FWIN" fp16 window: fp16_window u64, fp16_layers count u32 + count i32
//     "FSNK" fp16 sinks: fp16_sinks u64
//     "DECY" low-width blocks (temporal decay, mixed precision): decay_after u64, decay_bits i32
//     "EVCT" eviction: max_coded_tokens u64
//     "QOPT" quantizer options (with an outlier split, norm correction or key/value-only
//            roles): norm_correction u32, outlier_roles u32, split_angle_bits u32
//     "HBIT" per-head widths: key_head_bits, value_head_bits, outlier_head_bits, each a count
//            u32 (0, n_kv_heads or n_layers * n_kv_heads) + count i32
//     "MIXD" mixed precision: mixed_group_blocks u64, mixed_keep_blocks u64
//     "KVHO" a KV head offset (KVCacheConfig::kv_head_offset > 0: the cache holds a slice of a
//            model's KV heads, whose random streams are those of the model's heads):
//            kv_head_offset u32. Absent for offset 0, so such files are unchanged.
//   ROTS, SINK, LAYR, WNDW and END are as in version 7 (LAYR always holds the evicted count;
//   its block flags, masks and WNDW's importance appear when the configuration has them).
//   Versions 1-7 stay readable, and writable on request (serialize_cache(..., legacy) /
//   save(path, legacy=True): the oldest of them that expresses the cache, for libraries that
//   predate version 8); a cache with a KV head offset has none (NotSupported).
// Loading reads the file into memory and checks every length against the bytes left before
// using it: a truncated, corrupted, wrong-magic or future-version file raises FormatError.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace turboquant {

class KVCache;

inline constexpr char kCacheMagic[8] = {'T', 'Q', 'K', 'V', 'C', 'A', 'C', 'H'};
inline constexpr uint32_t kCacheFormatVersion = 8;

// CRC32C (Castagnoli, reflected polynomial 0x82F63B78), as in iSCSI / ext4 / SSE4.2 crc32.
// crc32c("123456789") == 0xE3069283. Pass a previous result as `crc` to continue a stream.
// The x86-64 CPU's crc32 instruction where it has SSE4.2, else eight bytes a step by tables.
uint32_t crc32c(const void* data, size_t n, uint32_t crc = 0);

namespace detail {
// The two ways crc32c computes (tests compare them): eight-byte table steps, and the
// SSE4.2 instruction (crc32c_hardware_available(): this CPU has it; call it only then).
uint32_t crc32c_tables(const void* data, size_t n, uint32_t crc);
bool crc32c_hardware_available();
uint32_t crc32c_hardware(const void* data, size_t n, uint32_t crc);
}  // namespace detail

// The file bytes of `cache`: version 8 (the section container), or with `legacy` the oldest
// of versions 1-7 that expresses it (KVCacheConfig::format_version()), as libraries before
// version 8 wrote it (NotSupported for a cache with a KV head offset, which none expresses).
std::vector<uint8_t> serialize_cache(const KVCache& cache, bool legacy = false);
std::unique_ptr<KVCache> deserialize_cache(const uint8_t* data, size_t size);

}  // namespace turboquant
