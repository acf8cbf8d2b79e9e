// Crash-safe file replacement: a reader of `path` sees the old file (or none) or the complete
// new one, never a prefix, whatever moment the writer is killed at. The scheme (also
// python/turboquant/_atomic.py): write a temporary ".<name>.<pid>.<n>.tmp" in the same folder,
// flush it to the disk (fsync), rename it over `path` (atomic within one file system), then
// sync the folder so the rename itself survives a power cut.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace turboquant {

// Replace `path` with `size` bytes. Before writing, temporaries of `path` left by writers
// whose process no longer exists (killed mid-save) are removed, so at most the one of the
// last killed writer is ever left behind. Throws InvalidArgument naming the path and the
// failing step; on failure the temporary is removed and `path` is untouched.
void write_file_atomic(const std::string& path, const uint8_t* data, size_t size);

// The temporary file name write_file_atomic uses for `path` (tests and the Python side).
std::string atomic_temp_path(const std::string& path, long pid, unsigned long n);

}  // namespace turboquant
